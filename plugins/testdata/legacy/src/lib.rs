//! Test plugin: the root module an imagined vspc-backend-api 0.0.1 would
//! have exported (same name, another layout, an older version). The daemon
//! must refuse it with one readable line instead of calling into it.

// `#[derive(StableAbi)]` on prefix types expands to impls inside a
// generated const, which the non_local_definitions lint flags.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics, export_root_module, library::RootModule, package_version_strings,
    prefix_type::PrefixTypeTrait, sabi_types::VersionStrings, StableAbi,
};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = LegacyModRef)))]
pub struct LegacyMod {
    #[sabi(last_prefix_field)]
    pub make: extern "C" fn() -> u32,
}

impl RootModule for LegacyModRef {
    declare_root_module_statics! {LegacyModRef}
    const BASE_NAME: &'static str = "vspc_backend";
    const NAME: &'static str = "vspc_backend";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

extern "C" fn make() -> u32 {
    1
}

#[export_root_module]
fn root() -> LegacyModRef {
    LegacyMod { make }.leak_into_prefix()
}
