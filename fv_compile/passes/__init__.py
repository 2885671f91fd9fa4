"""The attention pass, one step per module: find_sites -> classify -> rewrite -> simplify_views."""
