#!/usr/bin/env python3
"""Paging QueryChangedDiskAreas, two ways, on a snapshot of --vm taken here:
once from offset 0 (what Bareos did: it sees only the first window), and in
the loop the API requires (next call at startOffset + length until the
capacity). Prints one JSON line: the single call's window and area count,
and every area the loop found."""

import argparse
import json

from pyVim.connect import SmartConnect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--protocol", default="https")
    p.add_argument("--password", required=True)
    p.add_argument("--vm", required=True)
    a = p.parse_args()
    si = SmartConnect(protocol=a.protocol, host=a.host, port=a.port, user="root", pwd=a.password,
                      disableSslCertValidation=True)
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vm = [v for v in view.view if v.name == a.vm][0]
        view.Destroy()
        task = vm.CreateSnapshot_Task(name="paging", description="", memory=False, quiesce=False)
        WaitForTask(task)
        snap = task.info.result
        try:
            disk = [d for d in snap.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)][0]
            capacity = disk.capacityInBytes
            once = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=0, changeId="*")
            areas, offset, calls = [], 0, 0
            while offset < capacity:
                info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=offset, changeId="*")
                assert info.startOffset == offset and info.length > 0
                areas += [[x.start, x.length] for x in info.changedArea]
                offset = info.startOffset + info.length
                calls += 1
            print(json.dumps({
                "capacity": capacity,
                "single": {"areas": len(once.changedArea), "end": once.startOffset + once.length},
                "calls": calls,
                "paged": areas,
            }))
        finally:
            WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))
    finally:
        Disconnect(si)


if __name__ == "__main__":
    main()
