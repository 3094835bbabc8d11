"""Building blocks the detectors combine: map operations, nearest neighbours and coresets,
Gaussian densities, normalizing flows, small networks, tiling, reconstruction residuals, defect
regions."""
