import MoECore
import MoEComm
let c = try MPICommunicator.initialize()
print(BLASInfo.coreName, c.rank, c.size)
c.finalize()
