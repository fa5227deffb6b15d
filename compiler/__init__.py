"""dlc's compiler: graph IR, op registry, lowering, autodiff, passes, fusion, code generation."""
import os as _os

# LLVM's optimization level for dlc's kernels: 2 unless the user's NUMBA_OPT says otherwise
# (read when Numba is imported, so only where dlc imports it first: `dlc` itself). Measured on
# this machine, 2 against Numba's default 3: the same training-step CPU time (MLP 0.082 /
# 0.082 ms, LeNet-5 2.49 / 2.49 ms, GRU/LSTM digits 0.68 / 0.67 ms; GPT 17.2 / 15.3 ms) and
# 6-16 % less cold compile (translate 10.4 -> 9.8 s, cnn_tuned 7.5 -> 6.3 s).
_os.environ.setdefault("NUMBA_OPT", "2")
