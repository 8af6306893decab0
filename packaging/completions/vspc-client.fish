complete -c vspc-client -s s -l server -d 'The vspc server' -r
complete -c vspc-client -s a -l admin-port -d 'Its admin port' -r
complete -c vspc-client -l client-lock-mode -d 'The lock to ask for on the VM\'s console' -r -f -a "exclusive\t'Nobody else may watch or type'
write\t'Nobody else may type; others may watch'
free-for-all\t'Everybody may type (fails while someone holds a write lock)'
free-for-all-fallback\t'free-for-all, or read-only while someone holds a write lock'"
complete -c vspc-client -l clear -d 'Disconnect every console of VM (a name or uuid), then exit' -r
complete -c vspc-client -l json -d 'With no VM: print the server\'s VM list as one line of JSON'
complete -c vspc-client -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vspc-client -s V -l version -d 'Print version'
