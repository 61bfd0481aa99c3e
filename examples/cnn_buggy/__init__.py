"""The CNN port with a deliberate bug (first BatchNorm epsilon 1e-3 instead of 1e-5) that lockstep must catch."""
