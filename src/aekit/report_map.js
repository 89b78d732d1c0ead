// The report's explorable latent map: inlined into report.html by aekit.report, loads nothing.
// Points come from <script type="application/json" id="aekit-map-data">; the thumbnails from
// two sprite sheets (<img id="aekit-sprite-original">, <img id="aekit-sprite-reconstruction">),
// point i's image in cell i (row i / cols, column i % cols). Hovering or tapping the map
// shows the nearest point's image and reconstruction, enlarged, and records its index on
// <figure id="aekit-map-figure" data-shown="i">. window.aekitMap.point(i) gives point i's
// position on screen (client pixels), for tests.
window.addEventListener("load", function () {
  var source = document.getElementById("aekit-map-data");
  if (!source) return;
  var map = JSON.parse(source.textContent);
  var canvas = document.getElementById("aekit-map");
  var figure = document.getElementById("aekit-map-figure");
  var info = document.getElementById("aekit-map-info");
  var ctx = canvas.getContext("2d");
  var n = map.x.length, W = canvas.width, H = canvas.height, PAD = 10, RADIUS = 2.5, REACH = 14;
  var span = function (v) {
    var lo = Math.min.apply(null, v), hi = Math.max.apply(null, v);
    return [lo, hi > lo ? hi : lo + 1];
  };
  var sx = span(map.x), sy = span(map.y);
  var px = new Float64Array(n), py = new Float64Array(n);  // canvas pixels, z[1] upwards
  for (var i = 0; i < n; i++) {
    px[i] = PAD + (map.x[i] - sx[0]) / (sx[1] - sx[0]) * (W - 2 * PAD);
    py[i] = H - PAD - (map.y[i] - sy[0]) / (sy[1] - sy[0]) * (H - 2 * PAD);
  }
  var shown = -1;

  function draw() {
    ctx.clearRect(0, 0, W, H);
    for (var i = 0; i < n; i++) {
      ctx.fillStyle = map.palette[map.colour[i]];
      ctx.fillRect(px[i] - RADIUS, py[i] - RADIUS, 2 * RADIUS, 2 * RADIUS);
    }
    if (shown >= 0) {
      ctx.strokeStyle = "#000";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(px[shown], py[shown], 3 * RADIUS, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }

  function show(i) {
    shown = i;
    var col = i % map.cols, row = Math.floor(i / map.cols);
    ["original", "reconstruction"].forEach(function (kind) {
      var view = document.getElementById("aekit-view-" + kind), c = view.getContext("2d");
      c.imageSmoothingEnabled = false;
      c.clearRect(0, 0, view.width, view.height);
      c.drawImage(document.getElementById("aekit-sprite-" + kind),
                  col * map.w, row * map.h, map.w, map.h, 0, 0, view.width, view.height);
    });
    info.textContent = "test image " + i + (map.label ? ", label " + map.label[i] : "") +
                       ", error " + map.error[i].toPrecision(3);
    figure.setAttribute("data-shown", String(i));
    draw();
  }

  function pick(event) {  // the nearest point within REACH canvas pixels of the pointer
    var r = canvas.getBoundingClientRect();
    var x = (event.clientX - r.left) * W / r.width, y = (event.clientY - r.top) * H / r.height;
    var best = -1, bestD = REACH * REACH;
    for (var i = 0; i < n; i++) {
      var d = (px[i] - x) * (px[i] - x) + (py[i] - y) * (py[i] - y);
      if (d < bestD) { best = i; bestD = d; }
    }
    if (best >= 0 && best !== shown) show(best);
  }

  canvas.addEventListener("pointermove", pick);
  canvas.addEventListener("pointerdown", pick);  // a tap on a touch screen
  window.aekitMap = {
    count: n,
    point: function (i) {
      var r = canvas.getBoundingClientRect();
      return { x: r.left + px[i] * r.width / W, y: r.top + py[i] * r.height / H };
    }
  };
  draw();
  figure.setAttribute("data-ready", "true");
});
