"""What a run leaves for people: the output folder around the tensors with its model card and
moekit.json (`write`, `card`), and profile tables, plots and HTML (`profile`)."""
