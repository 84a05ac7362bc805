"""stub"""

CASES = []
