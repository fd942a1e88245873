use crate::error::{DistError, Result};
use crate::Communicator;

/// A world of one process: every collective is the identity. Needs no MPI library.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl SingleProcess {
    pub fn new() -> Self {
        SingleProcess
    }
}

fn check_root(root: usize) -> Result<()> {
    if root == 0 {
        Ok(())
    } else {
        Err(DistError::Launch(format!(
            "broadcast from rank {root} in a world of 1 rank"
        )))
    }
}

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max_u64(&self, _buf: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root)
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_are_identity() {
        let c = SingleProcess::new();
        let mut a = vec![1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut a).unwrap();
        assert_eq!(a, vec![1.5, -2.0]);
        let mut b = vec![7u8, 8];
        c.broadcast_bytes(&mut b, 0).unwrap();
        assert_eq!(b, vec![7, 8]);
        assert!(c.broadcast_bytes(&mut b, 1).is_err());
        assert_eq!(c.all_gather_bytes(&[3]).unwrap(), vec![vec![3]]);
        assert_eq!(c.describe(), "single rank 0/1 (local 0/1)");
    }
}
