"""Data: readers, transforms, collation."""
