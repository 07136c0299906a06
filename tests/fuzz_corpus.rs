//! Replays every file of the fuzz seed corpus (`fuzz/corpus/<target>/`) through the same
//! property checks the cargo-fuzz targets run, on every path (each instruction set, one thread
//! and three), on stable Rust, so that the properties guard CI without nightly; and checks
//! that the property checks reject wrong results.

#[path = "../fuzz/props.rs"]
mod props;

use batchnorm::{oracle, Error};
use std::fs;
use std::path::Path;

fn replay(target: &str, check: fn(&[u8], Option<usize>)) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check(&data, None));
        assert!(
            result.is_ok(),
            "{target}: {} fails its properties",
            path.display()
        );
        files += 1;
    }
    assert!(files > 0, "{target}: empty corpus");
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus from disk")]
fn forward_train_corpus() {
    replay("forward_train", props::check_forward_train);
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus from disk")]
fn forward_eval_corpus() {
    replay("forward_eval", props::check_forward_eval);
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus from disk")]
fn moments_merge_corpus() {
    replay("moments_merge", props::check_moments_merge);
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus from disk")]
fn backward_corpus() {
    replay("backward", props::check_backward);
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus from disk")]
fn half_corpus() {
    replay("half", props::check_half);
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus from disk")]
fn fused_corpus() {
    replay("fused", props::check_fused);
}

/// The fused verifier rejects a fused output, statistic or gradient one unit in the last
/// place off the separate passes, for each epilogue.
#[test]
fn fused_verifier_rejects_wrong_results() {
    let up = |v: f32| f32::from_bits(v.to_bits() + 1);
    // Under Miri (minutes per case) the residual-and-ReLU epilogue only.
    let flags: &[u8] = if cfg!(miri) { &[7] } else { &[1, 2, 3, 6, 7] };
    for &flags in flags {
        for layout_flag in [0u8, 1] {
            let case = plain_case(layout_flag);
            let (shape, layout) = (case.shape, case.layout);
            let at = |c: usize| shape.index(layout, 1, c, 5);
            let h = props::FusedCase::of(case, flags);
            rejects(
                "fused",
                &props::run_fused(&h),
                |r| props::verify_fused(&h, r),
                &[
                    ("eval y", &|r| r.eval[at(1)] = up(r.eval[at(1)])),
                    ("in-place eval", &|r| {
                        r.eval_in_place[at(2)] = up(r.eval_in_place[at(2)])
                    }),
                    ("train y", &|r| r.train_y[at(3)] = up(r.train_y[at(3)])),
                    ("in-place train", &|r| {
                        r.train_in_place[at(0)] = up(r.train_in_place[at(0)])
                    }),
                    ("saved mean", &|r| {
                        let m = &mut r.train.as_mut().unwrap().0.mean[1];
                        *m = up(*m)
                    }),
                    ("running var", &|r| {
                        let v = &mut r.train.as_mut().unwrap().1.running_var[2];
                        *v = up(*v)
                    }),
                    ("dx", &|r| r.dx[at(4)] = up(r.dx[at(4)])),
                    ("dx alone", &|r| r.dx_alone[at(1)] = up(r.dx_alone[at(1)])),
                    ("d_residual", &|r| r.d_residual[at(2)] = 7.0),
                    ("dweight", &|r| {
                        r.grads[0].weight[3] = up(r.grads[0].weight[3])
                    }),
                    ("dbias", &|r| r.grads[1].bias[0] = up(r.grads[1].bias[0])),
                ],
            );
        }
    }
}

/// The 16-bit verifier rejects an output two units in the last place off, a wrong in-place
/// result, and a number where a NaN input must give NaN.
fn half_verifier_rejects<D: props::Half>(step: fn(D) -> D) {
    for flag in [0u8, 1] {
        let case = plain_case(flag);
        let (shape, layout) = (case.shape, case.layout);
        let at = |c: usize| shape.index(layout, 1, c, 5);
        let h = props::HalfCase::<D>::of(case);
        let verify = |r: &props::HalfRun<D>| props::verify_half(&h, r);
        rejects(
            "16-bit",
            &props::run_half(&h),
            verify,
            &[
                ("eval y", &|r| r.eval[at(1)] = step(step(r.eval[at(1)]))),
                ("train y", &|r| r.train[at(2)] = step(step(r.train[at(2)]))),
                ("dx", &|r| r.dx[at(3)] = step(step(r.dx[at(3)]))),
                ("in-place eval", &|r| {
                    r.eval_in_place[at(4)] = step(r.eval_in_place[at(4)])
                }),
            ],
        );
        let mut nan = h.clone();
        nan.x[at(0)] = D::from_f64(f64::NAN);
        let verify = |r: &props::HalfRun<D>| props::verify_half(&nan, r);
        rejects(
            "16-bit with a NaN",
            &props::run_half(&nan),
            verify,
            &[("NaN", &|r| r.eval[at(0)] = D::from_f64(0.5))],
        );
    }
}

#[test]
fn half_verifier_rejects_wrong_results() {
    use batchnorm::half::{bf16, f16};
    half_verifier_rejects::<f16>(|v| f16::from_bits(v.to_bits() + 1));
    half_verifier_rejects::<bf16>(|v| bf16::from_bits(v.to_bits() + 1));
}

/// A plain case: 3 x 5 x 17 uniform values in [-1, 1), eps 1e-5, momentum 0.1.
fn plain_case(layout_flag: u8) -> props::Case {
    props::decode(&[2, 4, 16, layout_flag, 6, 0, 0, 0, 1, 2, 3, 4]).expect("a case")
}

/// A named way to make a result wrong.
type Corruption<'a, R> = (&'a str, &'a dyn Fn(&mut R));

/// Asserts that `verify` accepts `good` and rejects each corruption of it.
fn rejects<R: Clone>(
    what: &str,
    good: &R,
    verify: impl Fn(&R) -> props::Verdict,
    corruptions: &[Corruption<'_, R>],
) {
    if let Err(e) = verify(good) {
        panic!("{what}: the right result rejected: {e}");
    }
    for (name, corrupt) in corruptions {
        let mut bad = good.clone();
        corrupt(&mut bad);
        assert!(verify(&bad).is_err(), "{what}: accepted a wrong {name}");
    }
}

/// The property checks can fail: each verifier, handed a result with one thing wrong (a value
/// off by 1e-3, a wrong statistic, a short output, a NaN confined wrongly), rejects it.
#[test]
fn verifiers_reject_wrong_results() {
    for flag in [0u8, 1] {
        let case = plain_case(flag);
        let refs = props::channels(&case);
        let (shape, layout) = (case.shape, case.layout);
        let at = |c: usize| shape.index(layout, 1, c, 5);

        let want = oracle::forward_train(&case.layer, &case.x, shape, layout);
        let verify = |r: &props::TrainRun| props::verify_forward_train(&case, &refs, &want, r);
        let too_few = Error::TooFewValues { per_channel: 1 };
        rejects(
            "training",
            &props::run_forward_train(&case),
            verify,
            &[
                ("y", &|r| r.y[at(1)] += 1e-3),
                ("y length", &|r| r.y.truncate(r.y.len() - 1)),
                ("in-place y", &|r| r.in_place[at(3)] = -r.in_place[at(3)]),
                ("batch mean", &|r| r.moments[1].mean += 1e-3),
                ("batch variance", &|r| r.moments[2].m2 *= 1.001),
                ("saved mean", &|r| r.saved.as_mut().unwrap().mean[0] += 1e-3),
                ("in-place invstd", &|r| {
                    r.in_place_saved.as_mut().unwrap().invstd[0] *= 1.01
                }),
                ("running mean", &|r| r.layer.running_mean[3] += 1e-3),
                ("running variance", &|r| r.layer.running_var[4] *= 1.001),
                ("refusal", &|r| r.saved = Err(too_few.clone())),
            ],
        );

        // A NaN input in channel 2: that channel NaN, every other one right.
        let mut nan_case = case.clone();
        nan_case.x[at(2)] = f32::NAN;
        let nan_refs = props::channels(&nan_case);
        let nan_want = oracle::forward_train(&nan_case.layer, &nan_case.x, shape, layout);
        rejects(
            "training with a NaN",
            &props::run_forward_train(&nan_case),
            |r| props::verify_forward_train(&nan_case, &nan_refs, &nan_want, r),
            &[
                ("NaN channel", &|r| r.y[shape.index(layout, 0, 2, 0)] = 0.0),
                ("NaN elsewhere", &|r| r.y[at(0)] = f32::NAN),
            ],
        );

        let want = oracle::forward_eval(&case.layer, &case.x, shape, layout);
        rejects(
            "inference",
            &props::run_forward_eval(&case),
            |r| props::verify_forward_eval(&case, &want, r),
            &[
                ("y", &|r| r.y[at(4)] *= 1.001),
                ("in-place y", &|r| r.in_place[at(0)] += 1e-3),
                ("folded in place", &|r| r.folded_in_place[at(2)] += 1e-3),
                ("folded length", &|r| r.folded.truncate(r.folded.len() - 1)),
            ],
        );

        rejects(
            "merge",
            &props::run_moments_merge(&case),
            |r| props::verify_moments_merge(&case, &refs, r),
            &[
                ("merged mean", &|r| r.parts[0][1].mean += 1e-3),
                ("merged variance", &|r| r.parts[1][3].m2 *= 1.001),
                ("count", &|r| r.whole[0].count += 1),
            ],
        );

        let saved = props::saved_stats(&case);
        let want = oracle::backward(&case.layer, &case.x, &case.dy, &saved, shape, layout);
        rejects(
            "backward",
            &props::run_backward(&case, &saved),
            |r| props::verify_backward(&case, &refs, &saved, &want, r),
            &[
                ("dx", &|r| r.dx[at(3)] += 1e-3),
                ("dbias", &|r| r.grads.bias[2] += 1e-3),
                ("dweight", &|r| r.grads.weight[4] += 1e-3),
                ("dx length", &|r| r.dx.truncate(r.dx.len() - 1)),
            ],
        );
        let saved = props::saved_stats(&nan_case);
        let want = oracle::backward(
            &nan_case.layer,
            &nan_case.x,
            &nan_case.dy,
            &saved,
            shape,
            layout,
        );
        rejects(
            "backward with a NaN",
            &props::run_backward(&nan_case, &saved),
            |r| props::verify_backward(&nan_case, &nan_refs, &saved, &want, r),
            &[
                ("NaN channel dx", &|r| {
                    r.dx[shape.index(layout, 2, 2, 16)] = 1.0
                }),
                ("NaN channel dweight", &|r| r.grads.weight[2] = 0.0),
            ],
        );
    }
}
