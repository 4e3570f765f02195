#[test]
fn loads() {
    let mut ebpf = aya::Ebpf::load(hasync_agent::EBPF_OBJECT).expect("load");
    let prog: &mut aya::programs::Xdp = ebpf.program_mut("hasync").unwrap().try_into().unwrap();
    if let Err(e) = prog.load() {
        panic!("{e:#?}");
    }
}
