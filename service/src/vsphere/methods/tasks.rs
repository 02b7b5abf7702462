//! The methods that change the host, run as tasks (`ReconfigVM_Task`,
//! snapshot and power tasks), and `QueryChangedDiskAreas`.

use super::*;

impl Api {
    /// Runs `work` as a task on VM `vm` (the task's entity also for
    /// snapshot methods, as hostd does): the task is finished (`success`
    /// with the result, or `error` with the fault) when this returns its
    /// reference.
    pub(super) fn vm_task(&self, vm: &str, method: &str, work: impl FnOnce() -> Result<Option<Val>, Fault>) -> MoRef {
        let queued = now();
        let outcome = work();
        let done = now();
        let mut reg = self.registry.lock();
        let entity = reg.vm_ref(vm);
        let vm_id = reg.vm_id(vm);
        let id = format!("haTask-{vm_id}-{method}-{}", reg.task_number());
        let task = MoRef::new("Task", id.clone());
        let mut info = Obj::new("TaskInfo")
            .with("key", Val::str(id.clone()))
            .with("task", task)
            .with("name", Val::str(method))
            .with("descriptionId", Val::str(method))
            .with("entity", entity)
            .with("entityName", Val::str(vm));
        info = match outcome {
            Ok(result) => info
                .with("state", Val::Enum("TaskInfoState", "success"))
                .with("cancelled", Val::Bool(false))
                .with("cancelable", Val::Bool(false))
                .opt("result", result.map(Val::any)),
            Err(f) => info
                .with("state", Val::Enum("TaskInfoState", "error"))
                .with("cancelled", Val::Bool(false))
                .with("cancelable", Val::Bool(false))
                .with(
                    "error",
                    Obj::new("LocalizedMethodFault")
                        .with("fault", f.to_obj())
                        .with("localizedMessage", Val::str(f.message.clone())),
                ),
        };
        info = info
            .with("queueTime", Val::Time(queued))
            .with("startTime", Val::Time(queued))
            .with("completeTime", Val::Time(done))
            .with(
                "eventChainId",
                Val::Int(i32::try_from(reg.task_number() % (i32::MAX as u64)).unwrap_or(0)),
            );
        reg.add_task(id, info)
    }

    pub(super) fn reconfigure(&self, vm: &str, spec: &ConfigSpec) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.reconfigure", || {
            if !spec.other.is_empty() {
                return Err(Fault::new(
                    FaultKind::NotSupported,
                    format!(
                        "cbtsim changes only changeTrackingEnabled and disk capacities, not {}",
                        spec.other.join(", ")
                    ),
                ));
            }
            let info = self.vm(vm)?;
            // Checked as a whole before anything changes.
            let mut grow = Vec::new();
            for c in &spec.device_change {
                let supported = c.operation.as_deref() == Some("edit")
                    && c.file_operation.is_none()
                    && c.device_type.as_deref().is_none_or(|t| t == "VirtualDisk");
                if !supported {
                    return Err(Fault::new(
                        FaultKind::NotSupported,
                        "cbtsim supports only deviceChange edits of a VirtualDisk's capacity",
                    ));
                }
                let key = c
                    .key
                    .ok_or_else(|| Fault::invalid_argument("deviceChange.device.key", "no device key"))?;
                let disk = objects::disk_index(key, info.disks.len()).ok_or_else(|| {
                    Fault::invalid_argument("deviceChange.device.key", format!("no disk with device key {key}"))
                })?;
                let bytes = match (c.capacity_in_bytes, c.capacity_in_kb) {
                    (Some(b), _) if b > 0 => b,
                    (_, Some(kb)) if kb > 0 => kb.saturating_mul(1024),
                    _ => continue,
                };
                let size = u64::try_from(bytes).unwrap_or(0);
                if size < info.disks[disk] {
                    return Err(Fault::invalid_argument(
                        "deviceChange.device.capacityInBytes",
                        format!("disk {key} cannot shrink from {} to {size} bytes", info.disks[disk]),
                    ));
                }
                if size > info.disks[disk] {
                    grow.push((disk, size));
                }
            }
            for (disk, size) in grow {
                self.execute(Request::DiskExtend {
                    vm: vm.to_owned(),
                    disk,
                    size,
                })
                .map_err(|e| match e.kind {
                    ErrorKind::InvalidArgument => {
                        Fault::invalid_argument("deviceChange.device.capacityInBytes", e.message)
                    }
                    _ => host_fault(e, &objects::disk_file(vm, disk)),
                })?;
            }
            if let Some(on) = spec.change_tracking_enabled {
                self.execute(Request::VmCbt { vm: vm.to_owned(), on })
                    .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            }
            Ok(None)
        })
    }

    pub(super) fn create_snapshot(
        &self,
        vm: &str,
        name: &str,
        description: &str,
        memory: bool,
        quiesce: bool,
    ) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.createSnapshot", || {
            if memory {
                return Err(Fault::new(
                    FaultKind::NotSupported,
                    "cbtsim VMs have no memory state: snapshot with memory=False",
                ));
            }
            let info = self.vm(vm)?;
            let before = self.snapshots(vm)?;
            let host_name = host_snapshot_name(name, &before);
            self.execute(Request::SnapshotCreate {
                vm: vm.to_owned(),
                name: host_name.clone(),
            })
            .map_err(|e| host_fault(e, &format!("[{}] {vm}/{vm}.vmsd", objects::DATASTORE)))?;
            let made = self
                .snapshots(vm)?
                .into_iter()
                .find(|s| s.name == host_name)
                .ok_or_else(|| Fault::new(FaultKind::NotFound, format!("snapshot {host_name} vanished")))?;
            let key = key_of(vm, &made);
            let mut reg = self.registry.lock();
            reg.snapshot_created(&key, name, description, quiesce, info.powered_on);
            Ok(Some(reg.snap_ref(&key).into()))
        })
    }

    pub(super) fn remove_snapshot(&self, k: &SnapKey, children: bool) -> MoRef {
        self.vm_task(&k.vm, "vim.vm.Snapshot.remove", || {
            let snaps = self.snapshots(&k.vm)?;
            let pos = snaps
                .iter()
                .position(|s| s.name == k.name && s.created == k.created)
                .ok_or_else(|| Fault::new(FaultKind::NotFound, "the snapshot is gone"))?;
            let doomed: Vec<&SnapshotEntry> = if children {
                snaps[pos..].iter().rev().collect()
            } else {
                vec![&snaps[pos]]
            };
            for s in doomed {
                self.execute(Request::SnapshotRemove {
                    vm: k.vm.clone(),
                    name: s.name.clone(),
                })
                .map_err(|e| host_fault(e, &objects::disk_file(&k.vm, 0)))?;
            }
            Ok(None)
        })
    }

    pub(super) fn revert(&self, k: &SnapKey) -> MoRef {
        self.vm_task(&k.vm, "vim.vm.Snapshot.revert", || {
            self.execute(Request::SnapshotRevert {
                vm: k.vm.clone(),
                name: k.name.clone(),
            })
            .map_err(|e| host_fault(e, &objects::disk_file(&k.vm, 0)))?;
            Ok(None)
        })
    }

    pub(super) fn revert_current(&self, vm: &str) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.revertToCurrentSnapshot", || {
            let current = self
                .snapshots(vm)?
                .pop()
                .ok_or_else(|| Fault::new(FaultKind::NotFound, "The VM has no snapshot"))?;
            self.execute(Request::SnapshotRevert {
                vm: vm.to_owned(),
                name: current.name,
            })
            .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            Ok(None)
        })
    }

    pub(super) fn remove_all(&self, vm: &str) -> MoRef {
        self.vm_task(vm, "vim.VirtualMachine.removeAllSnapshots", || {
            for s in self.snapshots(vm)?.into_iter().rev() {
                self.execute(Request::SnapshotRemove {
                    vm: vm.to_owned(),
                    name: s.name,
                })
                .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            }
            Ok(None)
        })
    }

    pub(super) fn power(&self, vm: &str, on: bool) -> MoRef {
        let method = if on {
            "vim.VirtualMachine.powerOn"
        } else {
            "vim.VirtualMachine.powerOff"
        };
        self.vm_task(vm, method, || {
            let v = self.vm(vm)?;
            if v.powered_on == on {
                let state = if on { "poweredOn" } else { "poweredOff" };
                return Err(Fault::new(
                    FaultKind::InvalidPowerState {
                        requested: None,
                        existing: state,
                    },
                    format!("The attempted operation cannot be performed in the current state ({state})."),
                ));
            }
            self.execute(Request::VmPower { vm: vm.to_owned(), on })
                .map_err(|e| host_fault(e, &objects::disk_file(vm, 0)))?;
            Ok(None)
        })
    }

    // ----- change tracking -----

    pub(super) fn query(&self, vm: &str, this: &MoRef, m: &Method) -> Result<Obj, Fault> {
        let Method::QueryChangedDiskAreas {
            snapshot,
            device_key,
            start_offset,
            change_id,
        } = m
        else {
            return Err(method_not_found(this, m));
        };
        let snap = snapshot
            .as_ref()
            .ok_or_else(|| Fault::invalid_argument("snapshot", "cbtsim needs the snapshot to query"))?;
        let key = match self.registry.lock().resolve(snap) {
            Some(Entity::Snapshot(k)) => k,
            _ => return Err(Fault::not_found(snap)),
        };
        let entry = self.snapshot(&key)?;
        if key.vm != vm {
            return Err(Fault::invalid_argument(
                "snapshot",
                format!("snapshot {} is not a snapshot of VM {vm}", snap.id),
            ));
        }
        let disk = objects::disk_index(*device_key, entry.disks.len()).ok_or_else(|| {
            Fault::invalid_argument(
                "deviceKey",
                format!(
                    "A specified parameter was not correct: deviceKey ({device_key} is not a disk of the snapshot)"
                ),
            )
        })?;
        let start = u64::try_from(*start_offset).map_err(|_| {
            Fault::invalid_argument(
                "startOffset",
                format!("A specified parameter was not correct: startOffset ({start_offset} is negative)"),
            )
        })?;
        let file = objects::disk_file(vm, disk);
        let page = match self.execute(Request::QueryPage {
            vm: vm.to_owned(),
            snapshot: key.name.clone(),
            disk,
            start_offset: start,
            since: change_id.trim().to_owned(),
            max_areas: Some(self.max_areas),
        }) {
            Ok(Response::ChangedAreaPage(p)) => p,
            Ok(r) => return Err(unexpected(r)),
            Err(e) => return Err(query_fault(e, &file)),
        };
        let long = |x: u64| Val::Long(i64::try_from(x).unwrap_or(i64::MAX));
        Ok(Obj::new("DiskChangeInfo")
            .with("startOffset", Val::Long(*start_offset))
            .with("length", long(page.length))
            .with(
                "changedArea",
                Val::Array(
                    "DiskChangeExtent",
                    page.changed_area
                        .iter()
                        .map(|a| {
                            Val::Obj(
                                Obj::new("DiskChangeExtent")
                                    .with("start", long(a.start))
                                    .with("length", long(a.length)),
                            )
                        })
                        .collect(),
                ),
            ))
    }
}
