"""Task environments: each gives tasks, tools and a verifier."""
