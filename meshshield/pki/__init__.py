"""meshshield.pki"""
