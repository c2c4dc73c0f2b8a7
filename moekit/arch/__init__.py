"""Architectures as data: the families moekit reads (`families`), the MoE architectures it writes
(`targets`), where an expert's tensors live (`layouts`), config fields for both transformers lines
(`compat`) and what each runtime computes (`runtimes`)."""
