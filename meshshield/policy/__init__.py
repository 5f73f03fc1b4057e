"""meshshield.policy"""
