// A small HTTP server: answers every request on port 3000 and logs it.
const http = require("http");
const os = require("os");

const port = Number(process.env.PORT || 3000);
let served = 0;

const server = http.createServer((req, res) => {
  served += 1;
  console.log(`${req.method} ${req.url} (#${served})`);
  res.writeHead(200, { "Content-Type": "text/plain" });
  res.end(`Hello from my-node-app on ${os.hostname()} (node ${process.version})\n`);
});

server.listen(port, () => console.log(`listening on ${port}`));

// `vmc stop` sends SIGTERM: stop listening and exit cleanly (node 18 would
// otherwise wait for idle keep-alive connections to time out).
process.on("SIGTERM", () => {
  console.log("SIGTERM: shutting down");
  server.close();
  process.exit(0);
});
