//! The candle layer (`candle` feature) against `candle_nn::BatchNorm`: a small CNN trained a
//! few steps with each gives the same losses, parameters and running statistics within
//! rounding; outputs and gradients agree per call in f32, f16 and bf16, training and
//! inference, NCHW and channels-last views; bad input is an error.

mod common;

use batchnorm::candle as ours;
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, D};
use candle_nn::{Conv2dConfig, Optimizer, VarBuilder, VarMap};
use common::Rng;

/// A tensor's values in f64.
fn values(t: &Tensor) -> Vec<f64> {
    let t = t.to_dtype(DType::F64).unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| / (1 + |b|) over all elements.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// A tensor of `dims` with values `offset + spread * u`, `u` uniform in [-1, 1), from `rng`:
/// the same inputs on every run (candle's CPU generator cannot be seeded, and the comparisons
/// with candle_nn's f32 sums depend on the values).
fn uniform(rng: &mut Rng, dims: &[usize], offset: f64, spread: f64) -> Tensor {
    let len = dims.iter().product();
    Tensor::from_vec(rng.data::<f32>(len, offset, spread), dims, &Device::Cpu).unwrap()
}

/// A variable holding `t`'s values (`(N, C, H, W)`), in NHWC memory when `channels_last`,
/// and the `(N, C, H, W)` view of it that goes into a layer (channels-last strides then).
/// (`Var::from_tensor` copies into a standard tensor, so the view is made after it.)
fn variable(t: &Tensor, channels_last: bool) -> (candle_core::Var, Tensor) {
    if channels_last {
        let v = candle_core::Var::from_tensor(&t.permute((0, 2, 3, 1)).unwrap()).unwrap();
        let view = v.as_tensor().permute((0, 3, 1, 2)).unwrap();
        assert_eq!(view.stride()[1], 1, "a channels-last view");
        (v, view)
    } else {
        let v = candle_core::Var::from_tensor(t).unwrap();
        let view = v.as_tensor().clone();
        (v, view)
    }
}

struct Net<B> {
    c1: candle_nn::Conv2d,
    bn1: B,
    c2: candle_nn::Conv2d,
    bn2: B,
    out: candle_nn::Linear,
}

impl<B: ModuleT> Net<B> {
    fn new(vb: VarBuilder, bn: impl Fn(usize, VarBuilder) -> Result<B>) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Net {
            c1: candle_nn::conv2d(3, 8, 3, cfg, vb.pp("c1"))?,
            bn1: bn(8, vb.pp("bn1"))?,
            c2: candle_nn::conv2d(8, 6, 3, cfg, vb.pp("c2"))?,
            bn2: bn(6, vb.pp("bn2"))?,
            out: candle_nn::linear(6, 2, vb.pp("out"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_t(&self.c1.forward(x)?, train)?.relu()?;
        let x = self.bn2.forward_t(&self.c2.forward(&x)?, train)?.relu()?;
        self.out.forward(&x.mean(D::Minus1)?.mean(D::Minus1)?)
    }
}

/// Trains the net `steps` SGD steps from the variables in `init`; the losses and the
/// variables after.
fn train<B: ModuleT>(
    init: &VarMap,
    bn: impl Fn(usize, VarBuilder) -> Result<B>,
    x: &Tensor,
    target: &Tensor,
    steps: usize,
) -> (Vec<f32>, VarMap, Tensor) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = Net::new(vb, bn).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let from = &init.data().lock().unwrap()[name];
        var.set(&from.as_tensor().copy().unwrap()).unwrap();
    }
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 0.05).unwrap();
    let mut losses = vec![];
    for _ in 0..steps {
        let loss = candle_nn::loss::mse(&net.forward(x, true).unwrap(), target).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        sgd.backward_step(&loss).unwrap();
    }
    let eval = net.forward(x, false).unwrap();
    (losses, varmap, eval)
}

#[test]
fn a_small_cnn_trains_as_with_candle_nn() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(1);
    let x = uniform(&mut rng, &[4, 3, 9, 9], 0.5, 3.5);
    let target = uniform(&mut rng, &[4, 2], 0.0, 1.7);
    let init = VarMap::new();
    let vb = VarBuilder::from_varmap(&init, DType::F32, &dev);
    Net::new(vb, |c, vb| candle_nn::batch_norm(c, 1e-5, vb)).unwrap();
    let steps = 6;
    let (theirs, theirs_vars, theirs_eval) = train(
        &init,
        |c, vb| candle_nn::batch_norm(c, 1e-5, vb),
        &x,
        &target,
        steps,
    );
    let (mine, mine_vars, mine_eval) = train(
        &init,
        |c, vb| ours::batch_norm(c, 1e-5, vb),
        &x,
        &target,
        steps,
    );
    for (step, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "loss at step {step}: ours {a} vs candle_nn {b}"
        );
    }
    assert!(
        theirs[steps - 1] < theirs[0],
        "the net did not learn: {theirs:?}"
    );
    let theirs_vars = theirs_vars.data().lock().unwrap();
    let mine_vars = mine_vars.data().lock().unwrap();
    assert_eq!(theirs_vars.len(), mine_vars.len());
    for (name, var) in theirs_vars.iter() {
        let d = rel_diff(mine_vars[name].as_tensor(), var.as_tensor());
        assert!(d <= 1e-5, "{name}: differs by {d:e}");
    }
    // The running statistics moved (they are among the variables compared above).
    let rm = mine_vars["bn1.running_mean"]
        .as_tensor()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(rm.to_scalar::<f32>().unwrap() > 0.0);
    assert!(rel_diff(&mine_eval, &theirs_eval) <= 1e-5);
}

/// One layer, one call: outputs, the gradients of x, weight and bias, and the running
/// statistics, against candle_nn's, in `dtype`, NCHW or as a channels-last view. The
/// reference is candle_nn in f32 on the same values (its BatchNorm cannot train on 16-bit
/// tensors: the running mean's update mixes f16 and f32); ours holds its parameters in the
/// tensors' type, as a 16-bit model would.
fn check_call(dtype: DType, channels_last: bool, train: bool, tol: f64) {
    let dev = Device::Cpu;
    let (n, c, h, w) = (3, 5, 4, 7);
    // The values of the 16-bit type, for both sides.
    let mut rng = Rng::new(2);
    let x = uniform(&mut rng, &[n, c, h, w], 10.0, 5.2);
    let x = x.to_dtype(dtype).unwrap();
    let probe = uniform(&mut rng, &[n, c, h, w], 0.0, 1.7);
    let probe = probe.to_dtype(dtype).unwrap();
    let varmaps = [VarMap::new(), VarMap::new()];
    let theirs_vb = VarBuilder::from_varmap(&varmaps[0], DType::F32, &dev);
    let theirs = candle_nn::batch_norm(c, 1e-5, theirs_vb).unwrap();
    let mine_vb = VarBuilder::from_varmap(&varmaps[1], dtype, &dev);
    let mine = ours::batch_norm(c, 1e-5, mine_vb).unwrap();
    let run = |layer: &dyn ModuleT, varmap: &VarMap, dtype: DType| {
        let vars: Vec<_> = ["weight", "bias"]
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let v = varmap.data().lock().unwrap()[*name].clone();
                // 0.75 and 1.0: exact in every type.
                let value = Tensor::ones(c, dtype, &dev).unwrap();
                v.set(&value.affine(0.25, 0.5 + k as f64 * 0.25).unwrap())
                    .unwrap();
                v
            })
            .collect();
        let (xv, input) = variable(&x.to_dtype(dtype).unwrap(), channels_last);
        let y = layer.forward_t(&input, train).unwrap();
        assert_eq!(y.dims(), x.dims());
        assert_eq!(y.dtype(), dtype);
        let probe = probe.to_dtype(dtype).unwrap();
        let loss = (&y * &probe).unwrap().to_dtype(DType::F32).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).expect("dx").clone();
        let gw = grads.get(vars[0].as_tensor()).expect("dweight").clone();
        let gb = grads.get(vars[1].as_tensor()).expect("dbias").clone();
        vec![y, gx, gw, gb]
    };
    let mut results = [
        run(&theirs, &varmaps[0], DType::F32),
        run(&mine, &varmaps[1], dtype),
    ];
    results[0].extend([theirs.running_mean().clone(), theirs.running_var().clone()]);
    results[1].extend([mine.running_mean().clone(), mine.running_var().clone()]);
    let names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"];
    for ((name, a), b) in names.iter().zip(&results[1]).zip(&results[0]) {
        let d = rel_diff(a, b);
        assert!(
            d <= tol,
            "{name} ({dtype:?}, channels_last {channels_last}, train {train}): {d:e}"
        );
    }
}

#[test]
fn calls_agree_with_candle_nn() {
    for train in [true, false] {
        for channels_last in [false, true] {
            // Largest differences seen: f32 3e-6 (dweight), f16 4.4e-4 (y: its rounding,
            // relative 2^-11), bf16 3.5e-3 (y, relative 2^-8).
            check_call(DType::F32, channels_last, train, 1e-5);
            check_call(DType::F16, channels_last, train, 1e-3);
            check_call(DType::BF16, channels_last, train, 8e-3);
        }
    }
}

#[test]
fn channels_last_output_keeps_the_layout() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let bn = ours::batch_norm(4, 1e-5, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 3, 4), &dev)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let y = bn.forward_t(&x, true).unwrap();
    assert_eq!(y.dims(), &[2, 4, 3, 3]);
    assert_eq!(y.stride(), x.stride(), "the output is channels-last too");
    // A transposed (H, W) view is neither layout: made contiguous, same values.
    let t = x.contiguous().unwrap().transpose(2, 3).unwrap();
    let yt = bn.forward_t(&t, false).unwrap();
    let want = bn.forward_t(&t.contiguous().unwrap(), false).unwrap();
    assert_eq!(rel_diff(&yt, &want), 0.0);
}

#[test]
fn in_place_inference_is_forward_eval() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = ours::batch_norm(6, 1e-3, vb).unwrap();
    let x = Tensor::randn(1f32, 2.0, (4, 6, 5), &dev).unwrap();
    bn.forward_t(&x, true).unwrap(); // move the running statistics off 0 and 1
    let want = bn.forward_t(&x, false).unwrap();
    let xy = x.copy().unwrap();
    bn.forward_inplace(&xy).unwrap();
    assert_eq!(rel_diff(&xy, &want), 0.0);
    let strided = Tensor::randn(0f32, 1.0, (4, 6, 10), &dev)
        .unwrap()
        .narrow(2, 0, 5)
        .unwrap();
    assert!(
        bn.forward_inplace(&strided).is_err(),
        "a gapped view in place"
    );
}

#[test]
fn bad_input_is_an_error() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = ours::batch_norm(3, 1e-5, vb.pp("a")).unwrap();
    let err = |r: Result<Tensor>| r.expect_err("accepted").to_string();
    assert!(
        err(bn.forward_t(&Tensor::zeros((2, 4, 3), DType::F32, &dev).unwrap(), true))
            .contains("channels")
    );
    assert!(
        err(bn.forward_t(&Tensor::zeros(3, DType::F32, &dev).unwrap(), false)).contains("(N, C")
    );
    assert!(
        err(bn.forward_t(&Tensor::zeros((2, 3), DType::F64, &dev).unwrap(), true)).contains("F64")
    );
    assert!(
        err(bn.forward_t(&Tensor::zeros((1, 3, 1), DType::F32, &dev).unwrap(), true))
            .contains("value")
    );
    let cfg = candle_nn::BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    assert!(ours::batch_norm(3, cfg, vb.pp("b")).is_err());
    let r = || Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert!(ours::BatchNorm::new(3, r(), r(), r(), r(), -1.0).is_err());
    assert!(ours::BatchNorm::new_with_momentum(3, r(), r(), r(), r(), 1e-5, 1.5).is_err());
    assert!(ours::BatchNorm::new(4, r(), r(), r(), r(), 1e-5).is_err());
    // The running statistics are untouched by a refused training call.
    let before = bn.running_mean().to_vec1::<f32>().unwrap();
    let _ = bn.forward_t(&Tensor::zeros((1, 3, 1), DType::F32, &dev).unwrap(), true);
    assert_eq!(bn.running_mean().to_vec1::<f32>().unwrap(), before);
}

/// `forward_t_fused` against the same work done with our plain layer and candle's add and
/// ReLU: outputs, the gradients of x, the residual, weight and bias, and the running
/// statistics, in `dtype`, NCHW or channels-last (the residual in the other layout too).
/// `x` takes the values -2, 0, 2 and the residual -0.5, 0.5, 1 (weight 0.75, bias 0.5), so
/// that no value before the ReLU lies within roundings of 0, where the two sides could gate
/// the gradient differently (checked below).
fn check_fused(dtype: DType, channels_last: bool, residual: bool, relu: bool, train: bool) {
    let dev = Device::Cpu;
    let (n, c, h, w) = (3, 5, 4, 7);
    let len = n * c * h * w;
    let from = |values: [f32; 3], k: usize| {
        let v: Vec<f32> = (0..len).map(|i| values[(i * k + i / 5) % 3]).collect();
        Tensor::from_vec(v, (n, c, h, w), &dev).unwrap()
    };
    let x = from([-2.0, 0.0, 2.0], 11).to_dtype(dtype).unwrap();
    let r = from([-0.5, 0.5, 1.0], 5).to_dtype(dtype).unwrap();
    let probe = uniform(&mut Rng::new(3), &[n, c, h, w], 0.0, 1.7);
    let varmaps = [VarMap::new(), VarMap::new()];
    let run = |varmap: &VarMap, fused: bool| {
        let vb = VarBuilder::from_varmap(varmap, dtype, &dev);
        let bn = ours::batch_norm(c, 1e-5, vb).unwrap();
        let vars: Vec<_> = [("weight", 0.75), ("bias", 0.5)]
            .iter()
            .map(|&(name, value)| {
                let v = varmap.data().lock().unwrap()[name].clone();
                v.set(
                    &Tensor::full(value, c, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                v
            })
            .collect();
        let (xv, input) = variable(&x, channels_last);
        // The residual lies in the other layout half of the time.
        let (rv, r_input) = variable(&r, channels_last != relu);
        let res = residual.then_some(&r_input);
        let y = if fused {
            bn.forward_t_fused(&input, res, relu, train).unwrap()
        } else {
            let y = bn.forward_t(&input, train).unwrap();
            let y = match res {
                Some(r) => (y + r).unwrap(),
                None => y,
            };
            let nearest = values(&y).iter().fold(f64::INFINITY, |m, v| m.min(v.abs()));
            assert!(nearest > 0.4, "a value {nearest} before the ReLU is near 0");
            if relu {
                y.relu().unwrap()
            } else {
                y
            }
        };
        assert_eq!(y.dims(), x.dims());
        assert_eq!(y.dtype(), dtype);
        if fused {
            assert_eq!(
                y.stride(),
                input.stride(),
                "the output has the input's layout"
            );
        }
        let loss = (&y * &probe.to_dtype(dtype).unwrap()).unwrap();
        let loss = loss.to_dtype(DType::F32).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut out = vec![
            y,
            grads.get(xv.as_tensor()).expect("dx").clone(),
            grads.get(vars[0].as_tensor()).expect("dweight").clone(),
            grads.get(vars[1].as_tensor()).expect("dbias").clone(),
            bn.running_mean().clone(),
            bn.running_var().clone(),
        ];
        if residual {
            out.push(grads.get(rv.as_tensor()).expect("d_residual").clone());
        }
        out
    };
    let (fused, separate) = (run(&varmaps[0], true), run(&varmaps[1], false));
    // f32: the fused output rounds once where the separate add rounds twice; 16-bit: the
    // separate passes round the normalized value to the type before adding (one rounding of
    // the type, relative 2^-11 or 2^-8, more near cancellation with the residual).
    let tol = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    };
    let names = [
        "y",
        "dx",
        "dweight",
        "dbias",
        "running_mean",
        "running_var",
        "d_residual",
    ];
    for ((name, a), b) in names.iter().zip(&fused).zip(&separate) {
        let d = rel_diff(a, b);
        assert!(
            d <= tol,
            "{name} ({dtype:?}, channels_last {channels_last}, residual {residual}, relu \
             {relu}, train {train}): {d:e}"
        );
    }
}

#[test]
fn fused_calls_are_the_separate_passes() {
    for train in [true, false] {
        for channels_last in [false, true] {
            for (residual, relu) in [(true, true), (true, false), (false, true)] {
                check_fused(DType::F32, channels_last, residual, relu, train);
                check_fused(DType::F16, channels_last, residual, relu, train);
                check_fused(DType::BF16, channels_last, residual, relu, train);
            }
        }
    }
}

#[test]
fn fused_bad_input_is_an_error() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = ours::batch_norm(3, 1e-5, vb).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
    let before = bn.running_mean().to_vec1::<f32>().unwrap();
    let err = |r: Result<Tensor>| r.expect_err("accepted").to_string();
    let short = Tensor::zeros((2, 3, 3), DType::F32, &dev).unwrap();
    assert!(err(bn.forward_t_fused(&x, Some(&short), true, true)).contains("residual"));
    let f16 = x.to_dtype(DType::F16).unwrap();
    assert!(err(bn.forward_t_fused(&x, Some(&f16), false, true)).contains("residual"));
    assert_eq!(bn.running_mean().to_vec1::<f32>().unwrap(), before);
}
