"""The paper's comparisons for any model and data: stress test (Table 1), accuracy against GFLOPs (Figs. 4, 5),
layer-wise information loss (Fig. 2), merged regions and tokens per block (Figs. 1, 6, 7).

Modules: `stress`, `compare` (on what they share: `ladders`, `timing`), `probe`, `visualize`; plots need the
optional `atm-cli[plot]` extra (matplotlib).
"""
