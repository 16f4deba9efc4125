// The route graph page: plotly draws the figure of the prompt picked (one figure per prompt);
// this script hides edges below the slider's threshold (no reload) and shows a head's attention
// row when an attention edge is clicked.
(function () {
  const graphs = PAGE_DATA.graphs;
  const graph = document.getElementById("graph");
  const slider = document.getElementById("threshold");
  const shown = document.getElementById("threshold-value");
  const counted = document.getElementById("edge-count");
  const panel = document.getElementById("panel");
  const picker = document.getElementById("prompt");
  let data = graphs[0];
  let edges = [];

  function showAbove(threshold) {
    const visible = edges.map((trace) => trace.meta.weight >= threshold);
    const drawn = visible.filter(Boolean).length;
    shown.textContent = threshold.toFixed(3);
    counted.textContent = drawn + " of " + edges.length + " edges";
    if (edges.length) {
      Plotly.restyle(graph, { visible: visible }, edges.map((_, i) => i + 1));
    }
  }

  function tokenAt(position) {
    const token = data.tokens[String(position)];
    return token === undefined ? String(position) : JSON.stringify(token);
  }

  function showHead(edge) {
    const key = edge.layer + "," + edge.head + "," + edge.dst;
    const row = data.attention[key];
    const title = "layer " + edge.layer + " head " + edge.head + ", query " + tokenAt(edge.dst) + "@" + edge.dst;
    if (!row) {
      panel.textContent = title + ": no attention row (" + data.attention_note + ")";
      return;
    }
    panel.innerHTML = "";
    const heading = document.createElement("div");
    heading.id = "panel-title";
    heading.textContent = title + ": attention over the keys";
    const plot = document.createElement("div");
    plot.id = "head-row";
    panel.append(heading, plot);
    const keys = row.map((_, u) => tokenAt(u) + "@" + u);
    Plotly.newPlot(plot, [{
      type: "bar", x: keys, y: row, marker: { color: row.map((_, u) => (u === edge.src ? "#d62728" : "#1f77b4")) },
      hovertemplate: "key %{x}<br>probability %{y:.4f}<extra></extra>",
    }], { height: 260, margin: { l: 50, r: 20, t: 10, b: 90 }, yaxis: { range: [0, 1], title: "probability" } },
    { displaylogo: false, responsive: true });
  }

  function draw(picked) {  // the figure of one prompt, the slider back at its threshold
    data = picked;
    edges = data.figure.data.slice(1);  // the nodes are trace 0
    panel.textContent = "Click an attention edge to see its head's attention row.";
    return Plotly.react(graph, data.figure.data, data.figure.layout, { displaylogo: false, responsive: true })
      .then(() => {
        slider.min = data.threshold;
        slider.max = Math.max(data.max_weight, data.threshold);
        slider.step = "any";
        slider.value = data.threshold;
        showAbove(data.threshold);
      });
  }

  if (picker) {
    graphs.forEach((g, i) => picker.add(new Option("prompt " + g.prompt_id, String(i))));
    picker.addEventListener("change", () => {
      document.body.dataset.ready = "no";
      draw(graphs[Number(picker.value)]).then(() => { document.body.dataset.ready = "yes"; });
    });
  }
  draw(data).then(() => {
    slider.addEventListener("input", () => showAbove(Number(slider.value)));
    graph.on("plotly_click", (event) => {
      const meta = event.points[0].data.meta;
      if (meta && meta.kind === "attn") showHead(meta);
    });
    document.body.dataset.ready = "yes";
  });
})();
