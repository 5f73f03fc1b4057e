"""meshshield.cas"""
