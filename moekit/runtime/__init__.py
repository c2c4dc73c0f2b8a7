"""The code that runs loaded transformers models: their MoE blocks and routing hooks (`moe`),
hidden-state capture (`capture`), and the only uses of transformers internals
(`transformers_private`)."""
