"""The views' table names and tracking name (projections/store.py writes them; service/quick_tree.py
reads the tree table straight from the embedded store)."""

# The views' layout version is in the table names and the tracking name: a new layout starts in
# new tables from notification 0 (a rebuild by itself), and old rows can never be misread.
SCHEMA = 1
TRACKING_NAME = f"snaptree:projections:v{SCHEMA}"

TREE = f"snaptree_view{SCHEMA}_tree"
MERGES = f"snaptree_view{SCHEMA}_merges"
TIMELINE = f"snaptree_view{SCHEMA}_timeline"
VIEW_TABLES = (TREE, MERGES, TIMELINE)
