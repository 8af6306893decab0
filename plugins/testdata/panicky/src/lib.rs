//! Test plugin: panics in `vm_connected` and `console_data`, so the tests
//! can show a broken backend is logged, not fatal.

use vspc_backend_api::{Backend, VmRecord};

vspc_backend_api::export_backend!(Panicky);

pub struct Panicky;

impl Backend for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }

    fn description(&self) -> &str {
        "test plugin that panics in vm_connected and console_data"
    }

    fn wants_console_data(&self) -> bool {
        true
    }

    fn vm_connected(&mut self, vm: &VmRecord) {
        panic!("panicky plugin: deliberate panic for VM {}", vm.name);
    }

    fn console_data(&mut self, _vm: &VmRecord, _data: &[u8]) {
        panic!("panicky plugin: deliberate panic on console data");
    }
}
