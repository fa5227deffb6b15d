"""dlc's compiler: graph IR, op registry, lowering, autodiff, passes, fusion, code generation."""
