"""Step 1 and step 5 of a backup run: take a consistent view of a disk (take.py), and always
remove it (view.py)."""
