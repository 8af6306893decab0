#!/usr/bin/env python3
"""List the VMs a vSPC knows, speaking vSPC.py's admin query protocol v3.

Usage: python3 tests/vspc_query.py HOST PORT

It behaves like vSPC.py's vSPCClient asked for no particular VM: send our
version, read the server's, ask for VM None with the default lock mode, and
read the "not found" listing (a count, then that many dicts). Prints one
`name:uuid:port` line per VM, sorted by name (`name:uuid` when the VM has no
port, as vSPCClient does). Standard library only.
"""

import pickle
import socket
import sys

Q_VERS = 3
Q_VM_NOTFOUND = "vm_not_found"
LOCK_MODE = "free_for_all_or_readonly"


def main(argv):
    if len(argv) != 3:
        sys.stderr.write("usage: %s HOST PORT\n" % argv[0])
        return 2
    host, port = argv[1], int(argv[2])
    with socket.create_connection((host, port), timeout=10) as sock:
        stream = sock.makefile("rwb")
        pickle.dump(Q_VERS, stream)
        stream.flush()
        server_vers = pickle.load(stream)
        if isinstance(server_vers, Exception):
            sys.stderr.write("server complained: %s\n" % server_vers)
            return 1
        if int(server_vers) != Q_VERS:
            sys.stderr.write("server speaks version %r, not %d\n" % (server_vers, Q_VERS))
            return 1
        pickle.dump(None, stream)
        pickle.dump(LOCK_MODE, stream)
        stream.flush()
        status = pickle.load(stream)
        if status != Q_VM_NOTFOUND:
            sys.stderr.write("unexpected status %r\n" % (status,))
            return 1
        count = pickle.load(stream)
        vms = [pickle.load(stream) for _ in range(count)]
    vms.sort(key=lambda vm: vm["name"])
    for vm in vms:
        line = "%s:%s" % (vm["name"], vm["uuid"])
        if vm["port"] is not None:
            line += ":%d" % vm["port"]
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
