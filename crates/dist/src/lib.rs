//! Communicators for data-parallel training: single process, MPI, NCCL
