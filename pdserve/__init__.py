"""Generated wire code for the pdserve.v1 protocol (see protos/ and pdserve/protogen/generate.py)."""
