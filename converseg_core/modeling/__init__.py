"""Model blocks. Import the modules directly (converseg_core.modeling.fusion, ...): this package
re-exports nothing so that importing one block does not build the others' dependencies."""
