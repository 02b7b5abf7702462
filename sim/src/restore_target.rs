//! The host as a restore target: `restore --to-vm` creates a VM and writes
//! a point's content into it through [`vadp::RestoreTarget`].

use tracker::Granularity;
use vadp::{RestoreDisk, RestoreTarget, VadpError};

use crate::{DiskSpec, Host, SimError};

impl RestoreTarget for Host {
    fn create_vm(&self, name: &str, disks: &[RestoreDisk]) -> Result<(), VadpError> {
        let specs = disks
            .iter()
            .map(|d| {
                let granularity = Granularity::new(d.granularity).map_err(SimError::Tracker)?;
                Ok(DiskSpec {
                    capacity: d.capacity,
                    granularity,
                })
            })
            .collect::<Result<Vec<_>, VadpError>>()?;
        Host::create_vm(self, name, &specs)?;
        Ok(())
    }

    fn write(&self, vm: &str, disk: usize, offset: u64, data: &[u8]) -> Result<(), VadpError> {
        Ok(self.vm(vm)?.write(disk, offset, data)?)
    }

    fn delete_vm(&self, name: &str) -> Result<(), VadpError> {
        Ok(Host::delete_vm(self, name)?)
    }
}
