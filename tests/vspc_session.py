#!/usr/bin/env python3
"""Open a console session through a vSPC's admin port, speaking vSPC.py's
query protocol v3 the way vSPC.py's vSPCClient does.

Usage: python3 tests/vspc_session.py HOST PORT VM MODE SECONDS [--send HEX]

VM is a VM name or uuid (the literal `None` asks for no VM, which lists
them); MODE is the lock mode string sent as is (`exclusive`, `write`,
`free_for_all`, `free_for_all_or_readonly`, or anything else to test the
server's refusal). With `--send HEX`, those bytes (hex) are typed once the
telnet session is open.

Output, one line each, flushed as it happens:

    status=<vm_found|vm_not_found|lock_invalid|lock_failed|...>
    count=N                    (vm_not_found) then N lines vm=name:uuid:port
    mode=<applied lock mode>   (vm_found)
    seed=<hex>                 (vm_found)
    ready                      (vm_found; our telnet offers are sent)
    data=<hex>                 every chunk of console data (IAC unescaped)
    end=eof|timeout            how the session ended
    exception=<text>           the server sent an Exception instead

The session lasts until the server closes it or SECONDS pass. Telnet is
spoken minimally: we offer WILL BINARY, WILL SGA, DO BINARY, DO SGA, accept
ECHO from the server, refuse everything else, and strip every command and
subnegotiation from the data. Standard library only.
"""

import pickle
import socket
import sys
import time

Q_VERS = 3

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
BINARY, ECHO, SGA = 0, 1, 3


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Telnet:
    """A small telnet receiver: splits data from commands, answers
    negotiation without looping."""

    def __init__(self):
        self.state = "data"
        self.verb = None
        # What we offered up front (see open_telnet): we perform BINARY and
        # SGA, and asked the server to perform BINARY and SGA.
        self.local = {BINARY, SGA}
        self.remote = {BINARY, SGA}

    def negotiate(self, verb, option, reply):
        if verb == WILL:
            if option in (BINARY, SGA, ECHO):
                if option not in self.remote:
                    self.remote.add(option)
                    reply += bytes([IAC, DO, option])
            else:
                reply += bytes([IAC, DONT, option])
        elif verb == WONT:
            if option in self.remote:
                self.remote.discard(option)
                reply += bytes([IAC, DONT, option])
        elif verb == DO:
            if option in (BINARY, SGA):
                if option not in self.local:
                    self.local.add(option)
                    reply += bytes([IAC, WILL, option])
            else:
                reply += bytes([IAC, WONT, option])
        elif verb == DONT:
            if option in self.local:
                self.local.discard(option)
                reply += bytes([IAC, WONT, option])

    def feed(self, chunk):
        """Returns (data, reply) for one received chunk."""
        data = bytearray()
        reply = bytearray()
        for b in chunk:
            if self.state == "data":
                if b == IAC:
                    self.state = "iac"
                else:
                    data.append(b)
            elif self.state == "iac":
                if b == IAC:
                    data.append(IAC)
                    self.state = "data"
                elif b in (WILL, WONT, DO, DONT):
                    self.verb = b
                    self.state = "verb"
                elif b == SB:
                    self.state = "sb"
                else:
                    self.state = "data"  # NOP, GA, ...: ignored
            elif self.state == "verb":
                self.negotiate(self.verb, b, reply)
                self.state = "data"
            elif self.state == "sb":
                if b == IAC:
                    self.state = "sb_iac"
            elif self.state == "sb_iac":
                self.state = "data" if b == SE else "sb"
        return bytes(data), bytes(reply)


def session(sock, stream, deadline, to_send):
    # vSPCClient's opening (VPY lib/admin.py): WILL BINARY, WILL SGA,
    # DO BINARY, DO SGA.
    stream.write(bytes([IAC, WILL, BINARY, IAC, WILL, SGA, IAC, DO, BINARY, IAC, DO, SGA]))
    stream.flush()
    out("ready")
    if to_send:
        stream.write(to_send.replace(b"\xff", b"\xff\xff"))
        stream.flush()
    telnet = Telnet()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            out("end=timeout")
            return
        sock.settimeout(left)
        try:
            # read1: whatever the buffer holds (the pickle reader may have
            # buffered the start of the telnet stream), else one recv.
            chunk = stream.read1(65536)
        except socket.timeout:
            out("end=timeout")
            return
        except OSError:
            out("end=eof")
            return
        if not chunk:
            out("end=eof")
            return
        data, reply = telnet.feed(chunk)
        if reply:
            stream.write(reply)
            stream.flush()
        if data:
            out("data=" + data.hex())


def main(argv):
    args = argv[1:]
    to_send = b""
    if "--send" in args:
        i = args.index("--send")
        to_send = bytes.fromhex(args[i + 1])
        del args[i : i + 2]
    if len(args) != 5:
        sys.stderr.write("usage: %s HOST PORT VM MODE SECONDS [--send HEX]\n" % argv[0])
        return 2
    host, port, vm, mode, seconds = args[0], int(args[1]), args[2], args[3], float(args[4])
    if vm == "None":
        vm = None
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, port), timeout=seconds) as sock:
        stream = sock.makefile("rwb")
        pickle.dump(Q_VERS, stream)
        stream.flush()
        server_vers = pickle.load(stream)
        if isinstance(server_vers, Exception):
            out("exception=%s" % server_vers)
            return 1
        if server_vers != Q_VERS:
            out("server_version=%r" % (server_vers,))
            return 1
        pickle.dump(vm, stream)
        pickle.dump(mode, stream)
        stream.flush()
        try:
            status = pickle.load(stream)
        except EOFError:
            out("end=eof")
            return 1
        if isinstance(status, Exception):
            out("exception=%s" % status)
            return 1
        out("status=%s" % status)
        if status == "vm_not_found":
            count = pickle.load(stream)
            out("count=%d" % count)
            for _ in range(count):
                entry = pickle.load(stream)
                out("vm=%s:%s:%s" % (entry["name"], entry["uuid"], entry["port"]))
            return 0
        if status != "vm_found":
            return 0
        out("mode=%s" % pickle.load(stream))
        seed = pickle.load(stream)
        if isinstance(seed, str):
            seed = seed.encode("utf-8", "surrogateescape")
        out("seed=" + seed.hex())
        session(sock, stream, deadline, to_send)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
