"""Make a vSPC.py File-backend store the way vSPC.py makes it, for vspc's tests.

    python3 tests/make_vspcpy_store.py FORMAT PREFIX [PROTOCOL [bulk]] < records.json

FORMAT is `gnu` (dbm.gnu), `dumb` (dbm.dumb) or `default` (shelve.open, as
vSPC.py calls it: the first dbm this Python has). PROTOCOL is the pickle
protocol (default: this Python's, as shelve uses). stdin holds a JSON list:
`[uuid, name, port]` items become vSPC.py's records, written one at a time
with a sync after each, as vSPC.py's vm_hook does; `{"raw": [KEYHEX,
VALUEHEX]}` items are stored as they are (for pickles Python 2 wrote, and
for hostile ones); `{"del": uuid}` deletes a record as vm_del_hook does.
With `bulk` the shelf is synced once at the end instead (the files are the
same; syncing after each of thousands of records takes long).
"""

import json
import shelve
import sys


def main():
    fmt, prefix = sys.argv[1], sys.argv[2]
    protocol = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    bulk = len(sys.argv) > 4 and sys.argv[4] == "bulk"
    items = json.load(sys.stdin)
    if fmt == "default":
        shelf = shelve.open(prefix, protocol=protocol)
    else:
        if fmt == "gnu":
            import dbm.gnu as module
        elif fmt == "dumb":
            import dbm.dumb as module
        else:
            sys.exit("unknown format " + fmt)
        shelf = shelve.Shelf(module.open(prefix, "c"), protocol=protocol)
    for item in items:
        if isinstance(item, dict) and "raw" in item:
            key, value = (bytes.fromhex(h) for h in item["raw"])
            shelf.dict[key] = value
        elif isinstance(item, dict) and "del" in item:
            del shelf[item["del"]]
        else:
            uuid, name, port = item
            shelf[uuid] = {"uuid": uuid, "name": name, "port": port}
        if not bulk:
            shelf.sync()
    shelf.close()


main()
