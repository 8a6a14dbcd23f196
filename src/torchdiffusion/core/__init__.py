"""The bottom layer: the noise process and its closed forms, prediction targets and the denoiser they become,
time grids, the data box, and the exact Gaussian mixture every test measures against. Imports only torch
and numpy."""
