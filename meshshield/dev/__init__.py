"""meshshield.dev"""
