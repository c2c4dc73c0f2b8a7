"""One module per verb: check the cheap things first (options, the output folder), open the
sources, plan or run, write; each returns what its command prints."""
