"""meshshield.sidecar"""
