"""Everything architecture-specific, behind one interface (``interface.py``) and one table (``registry.py``)."""
