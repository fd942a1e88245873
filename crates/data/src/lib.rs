//! HDF5 image datasets: format, converters and the rank-sharded streaming loader
