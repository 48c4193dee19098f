"""One module per notebook: the study's whole run as functions the notebook calls and the tests run on tiny data."""
