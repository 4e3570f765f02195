use hasync_tests::testrun::*;
#[test]
fn smoke() {
    let (tdp, t) = timed(|| TestDatapath::load().unwrap());
    eprintln!("load {t:?}");
    let mut f = vec![0u8; 60];
    f[12] = 0x08;
    f[13] = 0x06;
    eprintln!("{:?}", tdp.run(&f));
    eprintln!("{:?}", tdp.run(&f[..13]));
    eprintln!("{:?}", tdp.run(&f[..14]));
    eprintln!("{:?}", tdp.run_on(&f[..14], 999));
    eprintln!(
        "{}",
        CounterDelta {
            before: Default::default(),
            after: tdp.counters().unwrap()
        }
    );
}
