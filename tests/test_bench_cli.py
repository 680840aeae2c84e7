"""`channelslast-bench` end to end: the console script on tiny timm models with tiny sizes, the files it writes
(CSV, JSON, PNG) checked for content, and the messages for bad input. No timing decides anything here: the
numbers only have to be there, positive, and the reference speed-up exactly 1."""
import csv
import json
import statistics
import subprocess
import sys
from itertools import product
from pathlib import Path

import matplotlib.image
import pytest
from helpers import tiny_cnn

from channelslast_cb import bench
from channelslast_cb.bench import COLUMNS, LAYOUTS, bench_models, build_parser, main, supported_precisions

BIN = Path(sys.executable).parent
MODELS = ['test_resnet', 'test_efficientnet']  # toy models registered by timm for its own tests
TINY = ['--img-size', '32', '--batch-size', '2', '--steps', '2', '--repeats', '2', '--warmup', '1', '--device', 'cpu']


def run_cli(*args, module=False, timeout=600):
    "Run the installed console script (or `python -m channelslast_cb.bench`) with `args`"
    cmd = [sys.executable, '-m', 'channelslast_cb.bench'] if module else [str(BIN / 'channelslast-bench')]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def e2e(tmp_path_factory):
    "One run of the console script on two tiny models, the default precisions, all three files"
    d = tmp_path_factory.mktemp('bench')
    files = dict(csv=d / 'out' / 'r.csv', json=d / 'r.json', plot=d / 'r.png')
    p = run_cli(*MODELS, *TINY, '--threads', '1', '--csv', files['csv'], '--json', files['json'], '--plot', files['plot'])
    assert p.returncode == 0, p.stderr
    return p, files


def ran_precisions(e2e) -> list[str]:
    "The precisions the run says it ran (its first progress line), in order"
    line = next(l for l in e2e[0].stderr.splitlines() if l.startswith('channelslast-bench on '))
    return line.split('precisions ')[1].split(', ')


def test_cli_says_which_precisions_it_left_out(e2e):
    p, files = e2e
    left = json.loads(files['json'].read_text())['meta'].get('precisions_left_out', {})
    for prec, why in left.items():
        assert f'channelslast-bench: left out {prec}: {why}; run it anyway with --precision {prec}' in p.stderr


def test_cli_csv_rows_and_columns(e2e):
    _, files = e2e
    with open(files['csv']) as f: rows = list(csv.DictReader(f))
    precisions = ran_precisions(e2e)
    assert tuple(rows[0]) == COLUMNS
    assert sorted((r['model'], r['layout'], r['precision']) for r in rows) == sorted(product(MODELS, LAYOUTS, precisions))
    assert {(r['source'], r['mode'], r['device'], r['batch_size'], r['img_size']) for r in rows} == {('timm', 'train', 'cpu', '2', '32')}
    for m in MODELS:
        ref = [r for r in rows if r['model'] == m and (r['layout'], r['precision']) == ('contiguous', 'fp32')]
        assert [float(r['speedup']) for r in ref] == [1.0]
    for r in rows:
        for k in ('samples_per_s', 'step_ms', 'speedup', 'gflop_per_step', 'tflops', 'peak_tflops', 'pct_peak'):
            assert float(r[k]) > 0, (k, r)
        assert float(r['step_ms_min']) <= float(r['step_ms']) <= float(r['step_ms_max'])
        assert float(r['speedup_q1']) <= float(r['speedup']) <= float(r['speedup_q3'])


def test_cli_json_matches_csv(e2e):
    _, files = e2e
    d = json.loads(files['json'].read_text())
    with open(files['csv']) as f: csv_rows = list(csv.DictReader(f))
    assert len(d['rows']) == len(csv_rows) == len(MODELS) * len(LAYOUTS) * len(ran_precisions(e2e))
    assert [r['speedup'] for r in d['rows']] == pytest.approx([float(r['speedup']) for r in csv_rows])
    meta = d['meta']
    for r in d['rows']:  # the raw per-round step times, whose median is the step time
        assert len(r['round_ms']) == 2 and statistics.median(r['round_ms']) == pytest.approx(r['step_ms'])
    assert meta['device'] == 'cpu' and meta['threads'] == 1  # --threads took effect
    assert sorted(meta['matmul_peak_tflops']) == sorted(ran_precisions(e2e))
    # every precision the CPU supports either ran or is listed as left out, with the measured ratio
    left = meta.get('precisions_left_out', {})
    assert sorted([*ran_precisions(e2e), *left]) == sorted(supported_precisions('cpu')) and 'fp32' not in left
    assert all("probe training step took" in why for why in left.values()), left
    assert all(v > 0 for v in meta['matmul_peak_tflops'].values())
    assert meta['command'].startswith('channelslast-bench test_resnet test_efficientnet')


def test_cli_png_decodes(e2e):
    _, files = e2e
    img = matplotlib.image.imread(files['plot'])
    h, w, c = img.shape
    assert 400 <= h <= 3000 and 700 <= w <= 4000 and c in (3, 4), img.shape
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_cli_table_and_progress(e2e):
    p, files = e2e
    lines = p.stdout.splitlines()
    header = lines[0].split()
    for col in ('model', 'source', 'mode', 'layout', 'precision', 'samples/s', 'speed-up', 'TFLOP/s', 'peak'):
        assert col in header, header
    n = len(MODELS) * len(LAYOUTS) * len(ran_precisions(e2e))
    body = lines[2:2 + n]
    assert all(l.startswith(tuple(MODELS)) for l in body) and sum('1.00x' in l for l in body) >= len(MODELS)
    keeps = [l for l in body if l.endswith('<-')]  # one row per model: what to_channelslast(auto=True) would keep
    assert len(keeps) == len(MODELS) and {k.split()[0] for k in keeps} == set(MODELS), keeps
    assert [l.split(':')[0] for l in lines[2 + n:2 + 2 * n] if l.startswith('auto=')] == \
        [f'auto=True keeps for {m}' for m in MODELS]
    assert lines[2 + n + len(MODELS)].startswith('matmul peak: fp32 ')
    assert '[2/2] test_efficientnet train round 2/2' in p.stderr and f'wrote {files["plot"]}' in p.stderr


def test_cli_help_documents_every_option():
    "`python -m channelslast_cb.bench --help` (the module entry point), every option with its help text"
    p = run_cli('--help', module=True)
    assert p.returncode == 0, p.stderr
    actions = [a for a in build_parser()._actions if a.option_strings]
    assert len(actions) >= 14
    for a in actions:
        assert a.help, f"{a.option_strings} has no help text"
        for opt in a.option_strings: assert opt in p.stdout, opt
    assert 'MODEL' in p.stdout and 'torchvision:' in p.stdout


def test_unknown_model_lists_close_matches(capsys):
    "Checked before anything runs: the typo in the second name costs no time on the first"
    with pytest.raises(SystemExit) as e: main(['test_resnet', 'resnet5O', '--device', 'cpu'])
    assert e.value.code == 2
    out = capsys.readouterr()
    assert "unknown model 'resnet5O': not a timm model nor a torchvision classifier" in out.err
    assert 'close matches: resnet50' in out.err and out.out == ''


def test_unsupported_precision_names_the_working_ones(monkeypatch, capsys):
    monkeypatch.setattr(bench, 'supported_precisions', lambda device: ['fp32'])
    with pytest.raises(SystemExit) as e: main(['test_resnet', '--device', 'cpu', '--precision', 'bf16'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "precision 'bf16' is not supported on cpu" in err and 'supported there: fp32' in err


@pytest.mark.parametrize('argv, message', [
    (['test_resnet', '--precision', 'fp8'], "invalid choice: 'fp8'"),
    (['test_resnet', '--steps', '0'], 'argument --steps: 0 is less than 1'),
    (['test_resnet', '--batch-size', 'two'], "argument --batch-size: 'two' is not an integer"),
    (['test_resnet', '--device', 'cpu', '--plot', 'speedups.jpeg2'], '--plot speedups.jpeg2: the file name must end in one of'),
    (['keras:resnet50', '--device', 'cpu'], "source prefix 'keras' is not one of"),
    (['test_resnet', '--device', 'tpu9'], "device 'tpu9' is not a torch device"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_needs_the_fp32_reference(monkeypatch, capsys):
    monkeypatch.setattr(bench, 'supported_precisions', lambda device: ['fp32', 'bf16'])
    with pytest.raises(SystemExit) as e: main(['test_resnet', '--device', 'cpu', '--precision', 'bf16', '--plot', 'p.png'])
    assert e.value.code == 2
    assert '--plot draws speed-ups over contiguous fp32: add fp32 to --precision' in capsys.readouterr().err


def test_model_failing_at_run_time_exits_1_without_traceback(capsys):
    "A ViT built for 224 px refuses 32 px: the message names the model, mode, shape and the size it wants"
    code = main(['vit_tiny_patch16_224', '--img-size', '32', '--batch-size', '2', '--steps', '1', '--repeats', '1',
                 '--warmup', '0', '--precision', 'fp32', '--device', 'cpu', '--quiet'])
    assert code == 1
    out = capsys.readouterr()
    assert 'vit_tiny_patch16_224 (timm) failed in train mode on a batch of 2 x 3x32x32 on cpu' in out.err
    assert '--img-size 224' in out.err and 'Traceback' not in out.err


@pytest.mark.parametrize('name', ['lraspp_mobilenet_v3_large', 'tv:deeplabv3_mobilenet_v3_large'])
def test_torchvision_segmentation_models_run(name, capsys):
    "The help promises torchvision's segmentation models: built without any weights download, their 'out' map timed"
    assert main([name, *TINY, '--steps', '1', '--repeats', '1', '--warmup', '0', '--precision', 'fp32', '-q']) == 0
    out = capsys.readouterr()
    assert out.err == '' and name.split(':')[-1] in out.out and 'torchvision' in out.out
    model, bare, source = bench.create_model('fcn_resnet50')  # weights=None, weights_backbone=None: no download
    assert (bare, source, type(model).__name__) == ('fcn_resnet50', 'torchvision', 'FCN')


def test_help_says_which_models_it_takes_and_refuses_the_others(capsys):
    help_ = build_parser().format_help()
    assert 'torchvision semantic segmentation models' in help_ and 'not detection or video models' in help_
    with pytest.raises(SystemExit) as e: main(['fasterrcnn_resnet50_fpn', '--device', 'cpu'])
    assert e.value.code == 2
    assert "not a timm model nor a torchvision classifier or segmentation model" in capsys.readouterr().err


def test_quiet_prints_the_table_only(capsys):
    assert main(['test_resnet', *TINY, '--steps', '1', '--repeats', '1', '--warmup', '0', '--precision', 'fp32', '-q']) == 0
    out = capsys.readouterr()
    assert out.err == ''
    assert len(out.out.splitlines()) == 2 + 2 + 1 + 1 and 'test_resnet' in out.out


def test_api_inference_rows_per_mode():
    "`bench_models` on a module: a row per mode × layout × precision, each mode with its own reference"
    rows = bench_models([tiny_cnn()], batch_size=2, img_size=8, precisions=['fp32'], steps=1, repeats=2, warmup=1,
                        inference=True, device='cpu')
    assert [(r['model'], r['source'], r['mode'], r['layout']) for r in rows] == [
        ('Sequential', 'module', m, l) for m in ('train', 'infer') for l in LAYOUTS]
    assert [r['speedup'] for r in rows if r['layout'] == 'contiguous'] == [1.0, 1.0]
    train, infer = rows[0]['gflop_per_step'], rows[2]['gflop_per_step']
    assert 2 * infer <= train <= 3 * infer  # fwd + bwd: between two and three forwards
