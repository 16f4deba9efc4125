// The attention page: the head picker redraws the heatmap of the chosen head.
(function () {
  const data = PAGE_DATA;
  const plot = document.getElementById("heatmap");
  const picker = document.getElementById("head");

  function draw(index) {
    const head = data.heads[index];
    const trace = {
      type: "heatmap", z: head.z, x: head.x, y: head.y, text: head.text, hoverinfo: "text",
      colorscale: "Viridis", zmin: 0, colorbar: { title: { text: data.value } }, xgap: 1, ygap: 1,
    };
    const layout = {
      title: { text: head.label }, height: Math.max(420, 26 * head.y.length + 200),
      margin: { l: 120, r: 40, t: 50, b: 120 },
      xaxis: { title: { text: "key" }, tickvals: head.x, ticktext: head.x_labels, tickangle: -60, side: "bottom" },
      yaxis: { title: { text: "query" }, tickvals: head.y, ticktext: head.y_labels, autorange: "reversed" },
    };
    return Plotly.react(plot, [trace], layout, { displaylogo: false, responsive: true });
  }

  data.heads.forEach((head, i) => picker.add(new Option(head.label, String(i))));
  picker.addEventListener("change", () => {
    document.body.dataset.ready = "no";
    draw(Number(picker.value)).then(() => { document.body.dataset.ready = "yes"; });
  });
  draw(0).then(() => { document.body.dataset.ready = "yes"; });
})();
