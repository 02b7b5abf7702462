#!/usr/bin/env python3
"""One lifecycle operation on --vm through the vSphere API, waited for with
WaitForTask: snapshot NAME, revert NAME, remove NAME (NAME as shown in the
snapshot tree), extend DEVICE_KEY BYTES (ReconfigVM_Task editing the disk's
capacityInBytes), cbt on|off, power on|off."""

import argparse

from pyVim.connect import SmartConnect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim


def find_snapshot(vm, name):
    todo = list(vm.snapshot.rootSnapshotList) if vm.snapshot else []
    while todo:
        t = todo.pop()
        if t.name == name:
            return t.snapshot
        todo += t.childSnapshotList
    raise SystemExit("no snapshot named %r" % name)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--protocol", default="https")
    p.add_argument("--password", required=True)
    p.add_argument("--vm", required=True)
    p.add_argument("op", choices=["snapshot", "revert", "remove", "extend", "cbt", "power"])
    p.add_argument("args", nargs="*")
    a = p.parse_args()
    si = SmartConnect(protocol=a.protocol, host=a.host, port=a.port, user="root", pwd=a.password,
                      disableSslCertValidation=True)
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vm = [v for v in view.view if v.name == a.vm][0]
        view.Destroy()
        if a.op == "snapshot":
            task = vm.CreateSnapshot_Task(name=a.args[0], description="", memory=False, quiesce=False)
        elif a.op == "revert":
            task = find_snapshot(vm, a.args[0]).RevertToSnapshot_Task()
        elif a.op == "remove":
            task = find_snapshot(vm, a.args[0]).RemoveSnapshot_Task(removeChildren=False)
        elif a.op == "extend":
            key, size = int(a.args[0]), int(a.args[1])
            disk = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk) and d.key == key][0]
            disk.capacityInBytes = size
            disk.capacityInKB = size // 1024
            change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
            task = vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change]))
        elif a.op == "cbt":
            task = vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=a.args[0] == "on"))
        else:
            task = vm.PowerOnVM_Task() if a.args[0] == "on" else vm.PowerOffVM_Task()
        WaitForTask(task)
    finally:
        Disconnect(si)


if __name__ == "__main__":
    main()
