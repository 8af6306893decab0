# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_vspc_global_optspecs
    string join \n config= check-config= a/admin-port= admin-iface= admin-allow= proxy-port= proxy-iface= proxy-allow= r/port-range-start= i/interface= vm-expire-time= backend= backend-args= backend-help plugin-dir= f/persist-file= ssl cert= key= pidfile= no-vm-ports d/debug stdout no-fork syslog daemon multi-console client-limit= vm-tx-rate= handshake-timeout= identify-timeout= max-unidentified= vmotion-timeout= console-queue= console-stall-timeout= console-protocol= replay-bytes= console-replay backend-queue= http-port= http-iface= no-http http-token-file= http-cert= http-key= http-host= http-header-timeout= http-max-connections= ssh-port= ssh-iface= ssh-host-key= ssh-authorized-keys= ssh-auth-timeout= ssh-max-unauthenticated= ssh-idle-timeout= cluster= node-name= cluster-port= cluster-iface= cluster-advertise= cluster-secret-file= cluster-name= h/help V/version
end

function __fish_vspc_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_vspc_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_vspc_using_subcommand
    set -l cmd (__fish_vspc_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c vspc -n "__fish_vspc_needs_command" -l config -d 'Read settings from this TOML file (keys are the long flag names); command-line flags win over it' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l check-config -d 'Check the configuration and exit: the TOML FILE (or --config\'s) and the flags, naming every problem (unknown keys, bad values, unreadable certificates and key files, backend options, the File backend\'s map); exit status 1 if there is one. Nothing is written' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -s a -l admin-port -d 'Port for admin queries (vSPC.py\'s query protocol)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l admin-iface -d 'Address the admin port listens on. The admin port attaches consoles and clears them without authentication: an address that is not loopback needs --admin-allow' -r
complete -c vspc -n "__fish_vspc_needs_command" -l admin-allow -d 'Accept admin connections only from these networks (CIDR, repeatable and comma-separated); required when --admin-iface is not a loopback address (0.0.0.0/0 allows anyone, as vSPC.py did)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l proxy-port -d 'Port ESXi hosts connect to (the vSPC URI\'s port)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l proxy-iface -d 'Address the proxy port listens on (`::` for IPv6)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l proxy-allow -d 'Accept VM connections on the proxy port only from these networks (the ESXi hosts\'), in CIDR notation (10.0.0.0/8, 2001:db8::/32, or one address); repeatable and comma-separated. Anyone when not given' -r
complete -c vspc -n "__fish_vspc_needs_command" -s r -l port-range-start -d 'First console port; each VM gets the lowest free port from here' -r
complete -c vspc -n "__fish_vspc_needs_command" -s i -l interface -d 'Address the per-VM console ports listen on' -r
complete -c vspc -n "__fish_vspc_needs_command" -l vm-expire-time -d 'Seconds a VM keeps its port after its last VM or console connection closed' -r
complete -c vspc -n "__fish_vspc_needs_command" -l backend -d 'Backend(s): built-in Memory (default), File or Logging, or a plugin\'s name or path. Repeat the flag or separate names with commas to use several at once. Backend options (e.g. Logging\'s -l DIR) go anywhere on the command line' -r
complete -c vspc -n "__fish_vspc_needs_command" -l backend-args -d 'Options for the backend(s), as one string (vSPC.py\'s --backend-args)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l plugin-dir -d 'Look for backend plugins (libvspc_backend_NAME.so) here; repeatable. VSPC_PLUGIN_PATH (colon-separated) is searched next' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -s f -l persist-file -d 'Persist the port map in this file or directory (the File backend)' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l cert -d 'PEM certificate chain for --ssl' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l key -d 'PEM private key for --ssl (default: read it from --cert)' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l pidfile -d 'Write the process id to this file' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l client-limit -d 'Most consoles per VM; the next one is told the VM is full (or set VM_CLIENT_LIMIT=N)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l vm-tx-rate -d 'Pace console input to each VM at this many bytes per second (ESXi drops bytes written faster than the virtual UART drains)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l handshake-timeout -d 'Seconds a new VM connection has to enable the VMware extension (and a TLS client to finish its handshake)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l identify-timeout -d 'Seconds a VM connection may stay unidentified (no DO-PROXY with a uuid, no valid VMOTION-PEER) before it is closed' -r
complete -c vspc -n "__fish_vspc_needs_command" -l max-unidentified -d 'Most VM connections that may be open and not yet identified at once; past this, new ones are closed at accept (and counted)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l vmotion-timeout -d 'Seconds a vMotion may stay pending before it is dropped' -r
complete -c vspc -n "__fish_vspc_needs_command" -l console-queue -d 'Bytes of output that may wait for one console. A console that falls further behind stays connected: it skips the oldest output and is told, on a line of its own, how many bytes it missed' -r
complete -c vspc -n "__fish_vspc_needs_command" -l console-stall-timeout -d 'Seconds a console that is behind has to take at least 1 KiB/s on average while output waits for it (or to catch up); then it is told why (if it can still take that) and disconnected. 0 never disconnects' -r
complete -c vspc -n "__fish_vspc_needs_command" -l console-protocol -d 'How console-port clients are served: `auto` tells telnet clients and raw ones (gdb, socat, scripts) apart by the first byte they send; `telnet` and `raw` force one' -r -f -a "auto\t'Tell telnet clients and raw clients apart by what they send first'
telnet\t'Always telnet: negotiate at once, escape 0xFF, parse IAC'
raw\t'Always raw: bytes pass untouched both ways; no negotiation'"
complete -c vspc -n "__fish_vspc_needs_command" -l replay-bytes -d 'Bytes of each VM\'s most recent output kept in memory and shown, then a `-- live --` line, to a browser console, an SSH session or an admin session when it opens (so a panic printed before anyone came is seen); 0 keeps none' -r
complete -c vspc -n "__fish_vspc_needs_command" -l backend-queue -d 'Bytes of console output that may wait for one backend. A backend that needs every byte (Logging) makes the VMs that write wait past this; any other backend has output dropped for it' -r
complete -c vspc -n "__fish_vspc_needs_command" -l http-port -d 'Port of the HTTP API and /metrics [default: 13372]. The default port is best effort (taken: a warning, no HTTP); a port given here must be free' -r
complete -c vspc -n "__fish_vspc_needs_command" -l http-iface -d 'Address the HTTP port listens on; anything but loopback needs --http-token-file' -r
complete -c vspc -n "__fish_vspc_needs_command" -l http-token-file -d 'Bearer tokens for the HTTP port, one per line: TOKEN, `TOKEN rw` or `TOKEN ro` (read-only); `#` starts a comment' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l http-cert -d 'PEM certificate chain: serve the HTTP port over TLS' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l http-key -d 'PEM private key for --http-cert (default: read it from --http-cert)' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l http-host -d 'A name this server is reached by over HTTP (repeatable, comma-separated). Requests are answered only when their Host is an IP address, `localhost` or one of these names; any other Host gets 421 (a defence against DNS rebinding)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l http-header-timeout -d 'Seconds an HTTP client has to send a request\'s header (the first one, and each next one on a kept-alive connection); then the connection is closed' -r
complete -c vspc -n "__fish_vspc_needs_command" -l http-max-connections -d 'Most HTTP connections open at once (browser consoles included); past it a new connection is closed at once, and counted' -r
complete -c vspc -n "__fish_vspc_needs_command" -l ssh-port -d 'Port of the SSH front door (`ssh -p PORT VM@host`); off unless given' -r
complete -c vspc -n "__fish_vspc_needs_command" -l ssh-iface -d 'Address the SSH port listens on' -r
complete -c vspc -n "__fish_vspc_needs_command" -l ssh-host-key -d 'The SSH host key (OpenSSH format); an ed25519 key is made there, mode 0600, if the file does not exist' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l ssh-authorized-keys -d 'Public keys allowed in over SSH, in OpenSSH\'s authorized_keys format with vspc\'s options vms="GLOBS" and mode="MODE"; read again on SIGHUP. Needed with --ssh-port' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l ssh-auth-timeout -d 'Seconds an SSH connection may take to authenticate (from accept to an accepted key); then it is closed' -r
complete -c vspc -n "__fish_vspc_needs_command" -l ssh-max-unauthenticated -d 'SSH connections that may be waiting to authenticate at once; one more is closed as soon as it is accepted' -r
complete -c vspc -n "__fish_vspc_needs_command" -l ssh-idle-timeout -d 'Seconds an SSH connection may pass no console data either way before it is closed. 0 never closes it' -r
complete -c vspc -n "__fish_vspc_needs_command" -l cluster -d 'Cluster mode: the Redis control plane every node of the cluster shares, redis://[:PASSWORD@]HOST:PORT[/DB] or rediss://... Without it vspc is a single node' -r
complete -c vspc -n "__fish_vspc_needs_command" -l node-name -d 'This node\'s name in the cluster, unique among its live nodes (default: the host name)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l cluster-port -d 'Port the node link listens on (other nodes relay consoles to it)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l cluster-iface -d 'Address the node link listens on (default: --proxy-iface)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l cluster-advertise -d 'HOST:PORT other nodes dial to reach this one (default: --cluster-iface:--cluster-port; required when that is a wildcard)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l cluster-secret-file -d 'The secret every node of the cluster shares (mode 0600 or stricter); required with --cluster' -r -F
complete -c vspc -n "__fish_vspc_needs_command" -l cluster-name -d 'The cluster\'s name: the namespace of its keys in Redis (several clusters may share one Redis)' -r
complete -c vspc -n "__fish_vspc_needs_command" -l backend-help -d 'Print the options of the --backend(s) given, or list the built-in backends and the plugins found, then exit'
complete -c vspc -n "__fish_vspc_needs_command" -l ssl -d 'Speak TLS on the proxy port (telnets:// URIs)'
complete -c vspc -n "__fish_vspc_needs_command" -l no-vm-ports -d 'Open no per-VM console ports (consoles only through the admin port)'
complete -c vspc -n "__fish_vspc_needs_command" -s d -l debug -d 'Debug logging'
complete -c vspc -n "__fish_vspc_needs_command" -l stdout -d 'Log to standard output instead of standard error'
complete -c vspc -n "__fish_vspc_needs_command" -l no-fork -d 'Stay in the foreground (the default; accepted for vSPC.py scripts)'
complete -c vspc -n "__fish_vspc_needs_command" -l syslog -d 'Log to syslog (/dev/log) with name and PID'
complete -c vspc -n "__fish_vspc_needs_command" -l daemon -d 'Detach into the background (use with --pidfile in init scripts)'
complete -c vspc -n "__fish_vspc_needs_command" -l multi-console -d 'One console port per VM serial port: name and uuid get `_` + the port\'s service URI (or set SUPPORT_MULTI_CONSOLE=true)'
complete -c vspc -n "__fish_vspc_needs_command" -l console-replay -d 'Show that recent output to telnet clients on the console ports too (raw clients, such as gdb and scripts, never get it)'
complete -c vspc -n "__fish_vspc_needs_command" -l no-http -d 'Open no HTTP port (no API, no /metrics)'
complete -c vspc -n "__fish_vspc_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vspc -n "__fish_vspc_needs_command" -s V -l version -d 'Print version'
complete -c vspc -n "__fish_vspc_needs_command" -f -a "import" -d 'Import vSPC.py\'s port map (its File backend\'s shelve) into vspc\'s'
complete -c vspc -n "__fish_vspc_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c vspc -n "__fish_vspc_using_subcommand import" -l from-vspcpy -d 'The prefix vSPC.py was given with -f: its store is PREFIX (dbm.gnu) or PREFIX.dat and PREFIX.dir (dbm.dumb)' -r -F
complete -c vspc -n "__fish_vspc_using_subcommand import" -l to -d 'Write vspc\'s map to this file [default: where `vspc -f PREFIX` reads it, PREFIX.vspc-map.toml]' -r -F
complete -c vspc -n "__fish_vspc_using_subcommand import" -l dry-run -d 'Print the mappings and write nothing'
complete -c vspc -n "__fish_vspc_using_subcommand import" -l force -d 'Replace vspc\'s map if it exists (stop vspc first)'
complete -c vspc -n "__fish_vspc_using_subcommand import" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vspc -n "__fish_vspc_using_subcommand import" -s V -l version -d 'Print version'
complete -c vspc -n "__fish_vspc_using_subcommand help; and not __fish_seen_subcommand_from import help" -f -a "import" -d 'Import vSPC.py\'s port map (its File backend\'s shelve) into vspc\'s'
complete -c vspc -n "__fish_vspc_using_subcommand help; and not __fish_seen_subcommand_from import help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
