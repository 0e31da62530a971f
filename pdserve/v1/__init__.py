"""Generated from protos/pdserve/v1 by `make protos`; never edited by hand."""
