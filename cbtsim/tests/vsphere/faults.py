#!/usr/bin/env python3
"""The typed faults of cbtsim's vSphere API, checked by exception class with
pyvmomi, and the calls govmomi-based clients make (RetrievePropertiesEx with
property paths). The VM (--vm) must exist with CBT on, powered on, one disk.
Prints one line per check and exits non-zero at the first that fails."""

import argparse
import ssl
import sys
import uuid

from pyVim.connect import SmartConnect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl, SoapStubAdapter

CHECKS = []


def check(name):
    def wrap(f):
        CHECKS.append((name, f))
        return f
    return wrap


def raises(cls, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except cls as e:
        return e
    except Exception as e:  # noqa: BLE001
        raise AssertionError("expected %s, got %s: %s" % (cls.__name__, type(e).__name__, e))
    raise AssertionError("expected %s, nothing was raised" % cls.__name__)


class Ctx:
    pass


def snapshot(c, name, description=""):
    task = c.vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=False)
    WaitForTask(task)
    snap = task.info.result
    disk = [d for d in snap.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)][0]
    return snap, disk


def remove(snap):
    WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))


@check("wrong password: vim.fault.InvalidLogin")
def wrong_password(c):
    e = raises(vim.fault.InvalidLogin, SmartConnect, protocol=c.a.protocol, host=c.a.host, port=c.a.port,
               user="root", pwd="not-" + c.a.password, disableSslCertValidation=True)
    assert "incorrect user name or password" in e.msg, e.msg


@check("no session: vim.fault.NotAuthenticated")
def no_session(c):
    port = -c.a.port if c.a.protocol == "http" else c.a.port
    context = ssl._create_unverified_context() if c.a.protocol == "https" else None
    stub = SoapStubAdapter(c.a.host, port=port, version=c.si._stub.version, sslContext=context)
    anon = vim.ServiceInstance("ServiceInstance", stub)
    content = anon.RetrieveContent()  # allowed without a session
    assert content.about.apiType == "HostAgent"
    raises(vim.fault.NotAuthenticated, lambda: vim.VirtualMachine(c.vm._moId, stub).name)
    raises(vim.fault.NotAuthenticated, content.viewManager.CreateContainerView,
           content.rootFolder, [vim.VirtualMachine], True)


@check("unknown object: vmodl.fault.ManagedObjectNotFound")
def unknown_object(c):
    e = raises(vmodl.fault.ManagedObjectNotFound, lambda: vim.VirtualMachine("999", c.si._stub).name)
    assert e.obj._moId == "999", e.obj
    ghost = vim.vm.Snapshot("1-snapshot-999", c.si._stub)
    raises(vmodl.fault.ManagedObjectNotFound, c.vm.QueryChangedDiskAreas, snapshot=ghost, deviceKey=2000,
           startOffset=0, changeId="*")


@check("unknown method: vmodl.fault.MethodNotFound")
def unknown_method(c):
    e = raises(vmodl.fault.MethodNotFound, c.vm.MountToolsInstaller)
    assert e.method == "MountToolsInstaller", e.method
    e = raises(vmodl.fault.MethodNotFound, c.content.rootFolder.CreateFolder, "x")
    assert e.receiver == c.content.rootFolder, e.receiver


@check("bad deviceKey, startOffset at the end, malformed change ID: vmodl.fault.InvalidArgument")
def invalid_arguments(c):
    snap, disk = snapshot(c, "faults-args")
    try:
        e = raises(vmodl.fault.InvalidArgument, c.vm.QueryChangedDiskAreas, snapshot=snap, deviceKey=2001,
                   startOffset=0, changeId="*")
        assert e.invalidProperty == "deviceKey", e.invalidProperty
        e = raises(vmodl.fault.InvalidArgument, c.vm.QueryChangedDiskAreas, snapshot=snap, deviceKey=2000,
                   startOffset=disk.capacityInBytes, changeId="*")
        assert e.invalidProperty == "startOffset", e.invalidProperty
        e = raises(vmodl.fault.InvalidArgument, c.vm.QueryChangedDiskAreas, snapshot=snap, deviceKey=2000,
                   startOffset=-1, changeId="*")
        assert e.invalidProperty == "startOffset", e.invalidProperty
        for bad in ["garbage", "52 de c0/81", disk.backing.changeId.split("/")[0] + "/x"]:
            e = raises(vmodl.fault.InvalidArgument, c.vm.QueryChangedDiskAreas, snapshot=snap, deviceKey=2000,
                       startOffset=0, changeId=bad)
            assert e.invalidProperty == "changeId", (bad, e.invalidProperty)
        # The same answer with the change ID in either shape, and its window echoed.
        info = c.vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=4096, changeId="*")
        assert info.startOffset == 4096, info.startOffset
    finally:
        remove(snap)


@check("a change ID newer than the snapshot: InvalidArgument; a foreign one: vim.fault.FileFault")
def future_and_foreign(c):
    old, _ = snapshot(c, "faults-old")
    new, new_disk = snapshot(c, "faults-new")
    try:
        e = raises(vmodl.fault.InvalidArgument, c.vm.QueryChangedDiskAreas, snapshot=old, deviceKey=2000,
                   startOffset=0, changeId=new_disk.backing.changeId)
        assert e.invalidProperty == "changeId", e.invalidProperty
        b = uuid.uuid4().bytes
        foreign = "%s-%s/5" % (" ".join("%02x" % x for x in b[:8]), " ".join("%02x" % x for x in b[8:]))
        e = raises(vim.fault.FileFault, c.vm.QueryChangedDiskAreas, snapshot=new, deviceKey=2000,
                   startOffset=0, changeId=foreign)
        assert e.file.endswith(".vmdk"), e.file
        assert e.faultMessage and e.faultMessage[0].message, e.faultMessage
    finally:
        WaitForTask(old.RemoveSnapshot_Task(removeChildren=True))
    raises(vmodl.fault.ManagedObjectNotFound, lambda: new.config)


@check("CBT off and on: the old change ID is a vim.fault.FileFault, '*' still answers")
def cbt_reset(c):
    s1, d1 = snapshot(c, "faults-cbt1")
    remove(s1)
    WaitForTask(c.vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert c.vm.config.changeTrackingEnabled is False
    live = [d for d in c.vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)][0]
    assert live.backing.changeId is None, "no change ID while tracking is off"
    WaitForTask(c.vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert c.vm.config.changeTrackingEnabled is True
    s2, d2 = snapshot(c, "faults-cbt2")
    try:
        live = [d for d in c.vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)][0]
        assert live.backing.changeId == d2.backing.changeId, (live.backing.changeId, d2.backing.changeId)
        assert d2.backing.changeId.split("/")[0] != d1.backing.changeId.split("/")[0], "a new tracking session"
        e = raises(vim.fault.FileFault, c.vm.QueryChangedDiskAreas, snapshot=s2, deviceKey=2000, startOffset=0,
                   changeId=d1.backing.changeId)
        assert "Error caused by file" in e.msg, e.msg
        info = c.vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2000, startOffset=0, changeId="*")
        assert info.length > 0
    finally:
        remove(s2)


@check("failed tasks raise their fault from WaitForTask (vim.fault.InvalidPowerState)")
def task_errors(c):
    assert c.vm.runtime.powerState == "poweredOn"
    e = raises(vim.fault.InvalidPowerState, WaitForTask, c.vm.PowerOnVM_Task())
    assert e.existingState == "poweredOn", e.existingState
    WaitForTask(c.vm.PowerOffVM_Task())
    assert c.vm.runtime.powerState == "poweredOff"
    WaitForTask(c.vm.PowerOnVM_Task())
    assert c.vm.summary.runtime.powerState == "poweredOn"
    e = raises(vmodl.fault.NotSupported, WaitForTask, c.vm.ReconfigVM_Task(vim.vm.ConfigSpec(name="renamed")))
    assert "name" in e.msg, e.msg
    raises(vmodl.fault.NotSupported, WaitForTask,
           c.vm.CreateSnapshot_Task(name="with-memory", description="", memory=True, quiesce=False))
    assert c.vm.snapshot is None, "a refused snapshot leaves nothing behind"


@check("snapshot tree: names as given, a chain, currentSnapshot, revert to current")
def snapshot_tree(c):
    a, _ = snapshot(c, "VEEAM BACKUP TEMPORARY SNAPSHOT", "with spaces")
    b, _ = snapshot(c, "VEEAM BACKUP TEMPORARY SNAPSHOT")
    try:
        info = c.vm.snapshot
        root = info.rootSnapshotList[0]
        assert root.name == "VEEAM BACKUP TEMPORARY SNAPSHOT" and root.description == "with spaces", root
        assert root.snapshot == a and root.childSnapshotList[0].snapshot == b
        assert info.currentSnapshot == b
        assert a.childSnapshot == [b] and a.vm == c.vm
        WaitForTask(c.vm.RevertToCurrentSnapshot_Task())
    finally:
        WaitForTask(c.vm.RemoveAllSnapshots_Task())
    assert c.vm.snapshot is None


@check("RetrievePropertiesEx with property paths through a container view (govmomi style)")
def retrieve_properties(c):
    pc = c.content.propertyCollector
    view = c.content.viewManager.CreateContainerView(c.content.rootFolder, [vim.VirtualMachine], True)
    try:
        traversal = vmodl.query.PropertyCollector.TraversalSpec(name="v", type=vim.view.ContainerView, path="view",
                                                                skip=False)
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(
                type=vim.VirtualMachine, pathSet=["name", "config.hardware.device", "snapshot",
                                                  "config.changeTrackingEnabled", "runtime.powerState"])])
        res = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        mine = [o for o in res.objects if o.obj == c.vm]
        assert len(mine) == 1, res
        props = {p.name: p.val for p in mine[0].propSet}
        assert props["name"] == c.a.vm and props["config.changeTrackingEnabled"] is True, props
        disks = [d for d in props["config.hardware.device"] if isinstance(d, vim.vm.device.VirtualDisk)]
        assert disks[0].key == 2000 and disks[0].capacityInBytes > 0, disks
        assert "snapshot" not in props, "an unset property is left out"
        bad = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=c.vm)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["nosuch"])])
        raises(vmodl.query.InvalidProperty, pc.RetrievePropertiesEx, [bad],
               vmodl.query.PropertyCollector.RetrieveOptions())
    finally:
        view.Destroy()
    raises(vmodl.fault.ManagedObjectNotFound, lambda: view.view)


@check("Logout ends the session: vim.fault.NotAuthenticated after it")
def logout(c):
    si = SmartConnect(protocol=c.a.protocol, host=c.a.host, port=c.a.port, user="root", pwd=c.a.password,
                      disableSslCertValidation=True)
    content = si.RetrieveContent()
    assert content.sessionManager.currentSession.userName == "root"
    content.sessionManager.Logout()
    raises(vim.fault.NotAuthenticated, lambda: content.rootFolder.childEntity)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--protocol", default="https")
    p.add_argument("--password", required=True)
    p.add_argument("--vm", required=True)
    a = p.parse_args()
    c = Ctx()
    c.a = a
    c.si = SmartConnect(protocol=a.protocol, host=a.host, port=a.port, user="root", pwd=a.password,
                        disableSslCertValidation=True)
    c.content = c.si.RetrieveContent()
    view = c.content.viewManager.CreateContainerView(c.content.rootFolder, [vim.VirtualMachine], True)
    c.vm = [v for v in view.view if v.name == a.vm][0]
    view.Destroy()
    failed = 0
    for name, f in CHECKS:
        try:
            f(c)
            print("ok   " + name)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e))
    Disconnect(c.si)
    print("%d passed, %d failed" % (len(CHECKS) - failed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
