"""mlfe control plane: pure scaling deciders, the supervised control loop, and actuators."""
