// A telemetry daemon on the EdgeKey facade: its identity from the state directory (the key
// never leaves the TPM; enrolled again if the certificate expired while it was off), mTLS MQTT
// with a durable outbox, a command topic answered on a reply topic, automatic renewal, the
// counters as OpenMetrics (`metrics-file` in the configuration), and a clean stop on SIGTERM.
//
//   edgekey-telemetry CONFIG   (name = value lines: state, server, cafile, host, port, ...;
//                               see DeviceConfiguration(contentsOf:); INTERVAL=5 seconds)
import EdgeKey
import FoundationEssentials

await Device.main(configurationFile: CommandLine.arguments.last!) { device in
  let commands = try await device.messages("devices/\(device.name)/commands/#")
  Task {
    for await command in commands {
      try await device.publish(
        "devices/\(device.name)/replies", text: "done: \(String(decoding: command.payload, as: UTF8.self))")
    }
  }
  let interval = Int(ProcessInfo.processInfo.environment["INTERVAL"] ?? "5") ?? 5
  for reading in 0... {
    try await device.publish("devices/\(device.name)/telemetry", json: ["reading": reading])
    try await Task.sleep(for: .seconds(interval))
  }
}
