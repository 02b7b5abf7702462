#!/usr/bin/env python3
"""A changed-block-tracking backup of one VM through the vSphere API, written
as the VDDK programming guide describes the flow, with pyvmomi:

  enable CBT (ReconfigVM_Task changeTrackingEnabled) -> CreateSnapshot_Task
  -> read each disk's changeId from the snapshot's configuration
  -> QueryChangedDiskAreas(snapshot, deviceKey, offset, "*" or the last
     changeId), paging until the disk's capacity is covered
  -> read those areas of the snapshot's disk (NBD transport) into the backup
  -> record the new changeIds -> RemoveSnapshot_Task.

Run it again for an incremental. The backup of each disk is a raw image
(IMAGE_DIR/disk-KEY.raw) kept up to date, so a restore is a copy of it.
State (the last changeId of each disk) is kept in --state. A FileFault on
the last changeId (tracking was reset) falls back to a full backup, as
Bareos does. Prints one JSON line describing what it did.

The NBD export of a snapshot's disk on cbtsim serve is VM/DISK@SNAPSHOT
(DISK = deviceKey - 2000); that naming is the only cbtsim-specific part.
"""

import argparse
import json
import os
import sys
import time

from pyVim.connect import SmartConnect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbdread import Nbd  # noqa: E402


def connect(a):
    return SmartConnect(protocol=a.protocol, host=a.host, port=a.port, user=a.user,
                        pwd=a.password, disableSslCertValidation=True)


def find_vm(si, name):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            if vm.name == name:
                return vm
    finally:
        view.Destroy()
    raise SystemExit("no VM named %r" % name)


def disks_of(config):
    return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def changed_areas(vm, snap, key, capacity, change_id):
    """Every changed area, paging as the API requires: the next call starts
    where the last answer's window ends, until the capacity is covered."""
    areas, offset, calls = [], 0, 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        calls += 1
        if info.startOffset != offset or info.length <= 0:
            raise SystemExit("bad window %d+%d asked at %d" % (info.startOffset, info.length, offset))
        for a in info.changedArea:
            if a.start < offset or a.start + a.length > info.startOffset + info.length:
                raise SystemExit("area %d+%d outside its window" % (a.start, a.length))
            areas.append((a.start, a.length))
        offset = info.startOffset + info.length
    return areas, calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--protocol", default="https")
    p.add_argument("--user", default="root")
    p.add_argument("--password", required=True)
    p.add_argument("--nbd", required=True, help="HOST:PORT of the NBD exports")
    p.add_argument("--vm", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--image-dir", required=True)
    a = p.parse_args()

    state = {}
    if os.path.exists(a.state):
        with open(a.state) as f:
            state = json.load(f)
    nbd_host, nbd_port = a.nbd.rsplit(":", 1)

    si = connect(a)
    try:
        vm = find_vm(si, a.vm)
        if not vm.config.changeTrackingEnabled:
            WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
        snap_name = "backup-%d" % int(time.time() * 1000)
        task = vm.CreateSnapshot_Task(name=snap_name, description="cbtsim backup", memory=False, quiesce=False)
        WaitForTask(task)
        snap = task.info.result
        report = {"snapshot": snap._moId, "disks": []}
        try:
            new_state = {}
            for disk in disks_of(snap.config):
                key, capacity = disk.key, disk.capacityInBytes
                change_id = disk.backing.changeId
                since = state.get(str(key), "*")
                kind = "full" if since == "*" else "incremental"
                try:
                    areas, calls = changed_areas(vm, snap, key, capacity, since)
                except vim.fault.FileFault:
                    kind, since = "full (change ID no longer valid)", "*"
                    areas, calls = changed_areas(vm, snap, key, capacity, since)
                image = os.path.join(a.image_dir, "disk-%d.raw" % key)
                nbd = Nbd(nbd_host, int(nbd_port), "%s/%d@%s" % (a.vm, key - 2000, snap_name))
                if nbd.size != capacity:
                    raise SystemExit("NBD export has %d bytes, the disk %d" % (nbd.size, capacity))
                mode = "r+b" if os.path.exists(image) and kind == "incremental" else "w+b"
                with open(image, mode) as out:
                    out.truncate(capacity)
                    for start, length in areas:
                        out.seek(start)
                        out.write(nbd.pread(start, length))
                nbd.close()
                new_state[str(key)] = change_id
                report["disks"].append({
                    "key": key, "capacity": capacity, "kind": kind, "since": since,
                    "change_id": change_id, "areas": len(areas),
                    "bytes": sum(n for _, n in areas), "calls": calls,
                })
        finally:
            WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))
        left = vm.snapshot
        if left is not None and any(t.name == snap_name for t in left.rootSnapshotList):
            raise SystemExit("the snapshot was not removed")
        with open(a.state, "w") as f:
            json.dump(new_state, f)
        print(json.dumps(report))
    finally:
        Disconnect(si)


if __name__ == "__main__":
    main()
