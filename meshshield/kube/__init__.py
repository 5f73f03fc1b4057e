"""meshshield.kube"""
