"""python -m utils.deploy.formats: print the formats table (what docs/deployment.md shows)."""
from utils.deploy.formats import table

print(table())
